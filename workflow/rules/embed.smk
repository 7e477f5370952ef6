EMBED_SHARDS = with_defaults("embed", config["embed"])["shards"]
EMBED_GPU = 1 if config["embed"]["device"] != "cpu" else 0


if EMBED_SHARDS == 1:

    rule embed:
        """One embedding per training image, in sample_id order."""
        input:
            store_files("train"),
            code=library_code("embed"),
        output:
            embeddings=paths.embeddings(),
            meta=paths.embeddings_meta(),
        params:
            embed=config["embed"],
        log:
            paths.log("embed"),
        threads: workflow.cores
        resources:
            mem_mb=8000,
            gpu=EMBED_GPU,
        conda:
            "../envs/diffprune.yaml"
        script:
            "../scripts/embed.py"

else:

    rule embed_shard:
        """embed.shards > 1: one contiguous slice of whole batches, one GPU per job. Temporary:
        once gathered, a shard is not kept, and a missing one reruns nothing by itself."""
        input:
            store_files("train"),
            code=library_code("embed_shard"),
        output:
            embeddings=temp(paths.embeddings_shard("{shard}", EMBED_SHARDS)),
            meta=temp(paths.embeddings_shard_meta("{shard}", EMBED_SHARDS)),
        params:
            embed=config["embed"],
        log:
            paths.log("embed", "shard{shard}"),
        wildcard_constraints:
            shard=r"\d+",
        threads: workflow.cores
        resources:
            mem_mb=8000,
            gpu=EMBED_GPU,
        conda:
            "../envs/diffprune.yaml"
        script:
            "../scripts/embed_shard.py"

    rule embed_gather:
        """The shards' rows into the embeddings file rule embed writes (the same bytes)."""
        input:
            embeddings=[paths.embeddings_shard(i, EMBED_SHARDS) for i in range(EMBED_SHARDS)],
            metas=[paths.embeddings_shard_meta(i, EMBED_SHARDS) for i in range(EMBED_SHARDS)],
            code=library_code("embed_gather"),
        output:
            embeddings=paths.embeddings(),
            meta=paths.embeddings_meta(),
        log:
            paths.log("embed", "gather"),
        resources:
            mem_mb=2000,
        conda:
            "../envs/diffprune.yaml"
        script:
            "../scripts/embed_gather.py"


rule cluster:
    """k-means on the embeddings (fitted on all, or with cluster.fit_size on a seeded sample):
    each sample's cluster and distance to its centroid."""
    input:
        embeddings=paths.embeddings(),
        embeddings_meta=paths.embeddings_meta(),
        code=library_code("cluster"),
    output:
        clusters=paths.clusters(),
        centroids=paths.centroids(),
        meta=paths.clusters_meta(),
    params:
        cluster=config["cluster"],
    log:
        paths.log("cluster"),
    threads: workflow.cores
    resources:
        mem_mb=8000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/cluster.py"
