rule classifier:
    """A CNN trained on the labelled real images: a feature space for FD and a class-share judge."""
    input:
        train=store_files("train"),
        test=store_files("test"),
    output:
        model=paths.classifier(),
        metrics=paths.classifier_metrics(),
    params:
        classifier=config["classifier"],
        resolution=config["train"]["resolution"],
    log:
        paths.log("classifier"),
    threads: workflow.cores
    resources:
        mem_mb=4000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/classifier.py"


rule reference:
    """Features and Gaussian statistics of the held-out real images, once per feature space."""
    input:
        unpack(reference_inputs),
    output:
        paths.reference("{feature}"),
    params:
        evaluate=config["evaluate"],
        resolution=config["train"]["resolution"],
    log:
        paths.log("reference", "{feature}"),
    threads: workflow.cores
    resources:
        mem_mb=4000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/reference.py"


rule evaluate:
    """Metrics of one run's samples against the held-out references: one flat JSON."""
    input:
        unpack(evaluate_inputs),
    output:
        paths.metrics("{run}", "{seed}"),
    params:
        evaluate=config["evaluate"],
        resolution=config["train"]["resolution"],
    log:
        paths.log("evaluate", "{run}_s{seed}"),
    threads: workflow.cores
    resources:
        mem_mb=4000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/evaluate.py"
