rule report:
    """Paper-style tables (rows = method, columns = ratio) and metric-against-ratio plots."""
    input:
        metrics=[paths.metrics(run, seed) for run, seed in GRID],
    output:
        report_outputs(),
    params:
        study=config["study"],
        report=config["report"],
    log:
        paths.log("report"),
    threads: 1
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/report.py"
