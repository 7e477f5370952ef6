from diffprune.names import ROW_SCORES, SCORES

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


SCORE_SHARDS = with_defaults("scores", config["scores"])["shards"]
SCORE_GPU = 1 if config["train"]["device"] != "cpu" else 0


if SCORE_SHARDS == 1:

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

else:

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
        wildcard_constraints:
            score="|".join(s for s in SCORES if s not in ROW_SCORES),
        threads: workflow.cores
        resources:
            mem_mb=8000,
            gpu=1 if config["train"]["device"] != "cpu" else 0,
        conda:
            "../envs/diffprune.yaml"
        script:
            "../scripts/score.py"

    rule score_shard:
        """scores.shards > 1, el2n and grand: one contiguous slice of whole batches, each sample
        with its own draw, one GPU per job. Temporary: once gathered, a shard is not kept."""
        input:
            store=store_files("train"),
            surrogate=surrogate_for,
            code=library_code("score_shard"),
        output:
            scores=temp(paths.scores_shard("{score}", "{shard}", SCORE_SHARDS)),
            meta=temp(paths.scores_shard_meta("{score}", "{shard}", SCORE_SHARDS)),
        params:
            scores=config["scores"],
        log:
            paths.log("score", "{score}-shard{shard}"),
        wildcard_constraints:
            score="|".join(ROW_SCORES),
            shard=r"\d+",
        threads: workflow.cores
        resources:
            mem_mb=8000,
            gpu=SCORE_GPU,
        conda:
            "../envs/diffprune.yaml"
        script:
            "../scripts/score_shard.py"

    rule score_gather:
        """The shards' rows into the scores file rule score writes (the same bytes)."""
        input:
            scores=lambda w: [paths.scores_shard(w.score, i, SCORE_SHARDS) for i in range(SCORE_SHARDS)],
            metas=lambda w: [
                paths.scores_shard_meta(w.score, i, SCORE_SHARDS) for i in range(SCORE_SHARDS)
            ],
            code=library_code("score_gather"),
        output:
            scores=paths.scores("{score}"),
            meta=paths.scores_meta("{score}"),
        log:
            paths.log("score", "{score}-gather"),
        wildcard_constraints:
            score="|".join(ROW_SCORES),
        resources:
            mem_mb=2000,
        conda:
            "../envs/diffprune.yaml"
        script:
            "../scripts/score_gather.py"
