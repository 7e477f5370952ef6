rule report:
    """Paper-style tables (rows = method, columns = ratio), plots and the sample mosaic."""
    input:
        metrics=[paths.metrics(run, seed) for run, seed in GRID],
        grids=[paths.sample_grid(run, seed) for run, seed in GRID],
        skew=paths.skew_table("csv"),
        clusters_meta=CLUSTERS_META,
        code=library_code("report"),
    output:
        tables=[paths.report_table(m, "csv", REPORT) for m in report_metrics()]
        + [paths.report_table(m, "md", REPORT) for m in report_metrics()],
        plots=[
            report(
                paths.report_plot(m, REPORT),
                caption="../report/metric.rst",
                category="Metrics against ratio",
            )
            for m in report_metrics()
        ],
        cost=report(
            paths.report_plot("cost", REPORT), caption="../report/cost.rst", category="Cost"
        ),
        mosaic=report(
            paths.sample_mosaic(REPORT), caption="../report/samples.rst", category="Samples"
        ),
        markdown=paths.report_markdown(REPORT),
        claims_md=paths.claims("md", REPORT),
        claims_csv=paths.claims("csv", REPORT),
        summary=paths.summary(REPORT),
    params:
        study=config["study"],
        report=config["report"],
    log:
        paths.log("report"),
    threads: SMALL_JOB_THREADS
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/report.py"
