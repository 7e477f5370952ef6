rule train:
    """Diffusion model trained on the kept subset only, for the same number of steps every run."""
    input:
        unpack(train_inputs),
        code=library_code("train"),
    output:
        model=directory(paths.model("{run}", "{seed}")),
        log_dir=directory(paths.train_log("{run}", "{seed}")),
    params:
        train=config["train"],
        checkpoints=lambda wildcards: paths.checkpoints(wildcards.run, wildcards.seed),
    log:
        paths.log("train", "{run}_s{seed}"),
    threads: SMALL_JOB_THREADS  # small models: parallel jobs beat threads (see common.smk)
    resources:
        mem_mb=8000,
        # train.num_processes > 1: the script launches itself on that many processes, one GPU each
        gpu=config["train"].get("num_processes", 1) if config["train"]["device"] != "cpu" else 0,
        runtime=24 * 60,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/train.py"


rule sample:
    """Samples from the EMA weights (uint8, like the image store) and a PNG mosaic."""
    input:
        unpack(sample_inputs),
        code=library_code("sample"),
    output:
        samples=paths.samples("{run}", "{seed}"),
        grid=report(
            paths.sample_grid("{run}", "{seed}"),
            caption="../report/samples.rst",
            category="Samples",
            labels={"run": "{run}", "seed": "{seed}"},
        ),
    params:
        sample=config["sample"],
        device=config["train"]["device"],
    log:
        paths.log("sample", "{run}_s{seed}"),
    threads: SMALL_JOB_THREADS  # small models: parallel jobs beat threads (see common.smk)
    resources:
        mem_mb=8000,
        gpu=1 if config["train"]["device"] != "cpu" else 0,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/sample.py"
