from diffprune.data.fingerprint import source_fingerprint


rule download:
    """Image store of one split: images.npy (uint8 NHWC), index.parquet, store.json."""
    input:
        code=library_code("download"),
    output:
        images=paths.store_images("{split}"),
        index=paths.store_index("{split}"),
        meta=paths.store_meta("{split}"),
    params:
        data=config["data"],
        # paths, sizes and times of the local files the split reads (None for pinned sources):
        # adding, removing or changing a file changes it, and reruns the store and downstream
        fingerprint=lambda wildcards: source_fingerprint(config["data"], wildcards.split),
    log:
        paths.log("download", "{split}"),
    threads: SMALL_JOB_THREADS
    resources:
        mem_mb=4000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/download.py"
