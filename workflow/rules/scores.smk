rule surrogate:
    """Diffusion surrogates on the full training data, with snapshots (and loss records)."""
    input:
        store_files("train"),
        code=library_code("surrogate"),
    output:
        directory(paths.surrogate("{kind}")),
    params:
        train=config["train"],
        scores=config["scores"],
        checkpoints=lambda wildcards: paths.surrogate_checkpoints(wildcards.kind),
    log:
        paths.log("surrogate", "{kind}"),
    threads: workflow.cores
    resources:
        mem_mb=8000,
        gpu=1 if config["train"]["device"] != "cpu" else 0,
        runtime=24 * 60,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/surrogate.py"


rule score:
    """One score per training sample, computed once and reused by every ratio."""
    input:
        store=store_files("train"),
        surrogate=surrogate_for,
        code=library_code("score"),
    output:
        scores=paths.scores("{score}"),
        meta=paths.scores_meta("{score}"),
    params:
        scores=config["scores"],
    log:
        paths.log("score", "{score}"),
    threads: workflow.cores
    resources:
        mem_mb=8000,
        gpu=1 if config["train"]["device"] != "cpu" else 0,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/score.py"
