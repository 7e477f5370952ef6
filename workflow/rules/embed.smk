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
        gpu=1 if config["embed"]["device"] != "cpu" else 0,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/embed.py"


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
