rule select:
    """Prune manifest of one run: every training sample with keep=True/False and the evidence."""
    wildcard_constraints:
        run=names.SELECTED_RUN,
    input:
        unpack(selection_inputs),
        code=library_code("select"),
    output:
        manifest=paths.manifest("{run}", "{seed}"),
        meta=paths.manifest_meta("{run}", "{seed}"),
    params:
        select=config["select"],
        cluster=config["cluster"],
    log:
        paths.log("select", "{run}_s{seed}"),
    threads: SMALL_JOB_THREADS
    resources:
        mem_mb=4000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/select.py"
