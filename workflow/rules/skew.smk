# The fairness study: a skewed training set rebalanced with and without labels. Its runs are
# `skew-<arm>`; they train, sample and evaluate through the same rules as the main grid.


rule skew_select:
    """One arm's manifest over the train store (keep = the arm's training set)."""
    input:
        index=paths.store_index("train"),
        embeddings=paths.embeddings(),
        embeddings_meta=paths.embeddings_meta(),
        code=library_code("skew_select"),
    output:
        manifest=paths.manifest(f"{SKEW}{{arm}}", "{seed}"),
        meta=paths.manifest_meta(f"{SKEW}{{arm}}", "{seed}"),
    params:
        skew=config["skew"],
        cluster=config["cluster"],
    log:
        paths.log("skew_select", "{arm}_s{seed}"),
    threads: SMALL_JOB_THREADS
    resources:
        mem_mb=4000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/skew_select.py"


rule skew_report:
    """Class shares of each arm's kept data and of its generated samples, with fidelity."""
    input:
        metrics=[paths.metrics(run, seed) for run, seed in SKEW_RUNS],
        manifests=[paths.manifest(run, seed) for run, seed in SKEW_RUNS],
        index=paths.store_index("train"),
        store_meta=paths.store_meta("train"),
        code=library_code("skew_report"),
    output:
        csv=paths.skew_table("csv"),
        md=paths.skew_table("md"),
        plot=report(
            paths.skew_plot(), caption="../report/skew.rst", category="Fairness (skewed data)"
        ),
    params:
        skew=config["skew"],
    log:
        paths.log("skew_report"),
    threads: SMALL_JOB_THREADS
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/skew_report.py"
