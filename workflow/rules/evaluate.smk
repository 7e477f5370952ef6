rule classifier:
    """A CNN trained on the labelled real images: a feature space for FD and a class-share judge."""
    input:
        train=store_files("train"),
        test=store_files("test"),
        code=library_code("classifier"),
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
    """Real images of one split in one feature space (at the model's resolution), computed once."""
    input:
        unpack(reference_inputs),
        code=library_code("reference"),
    output:
        paths.reference("{split}", "{feature}"),
    params:
        evaluate=config["evaluate"],
        resolution=config["train"]["resolution"],
    log:
        paths.log("reference", "{split}_{feature}"),
    threads: workflow.cores
    resources:
        mem_mb=8000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/reference.py"


rule modes:
    """k-means modes of the training images in one feature space, for mode coverage."""
    input:
        paths.reference("train", "{feature}"),
        code=library_code("modes"),
    output:
        paths.modes("{feature}"),
    params:
        cluster=config["cluster"],
    log:
        paths.log("modes", "{feature}"),
    threads: workflow.cores
    resources:
        mem_mb=4000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/modes.py"


rule evaluate:
    """Metrics of one run's samples: fidelity, diversity, novelty, coverage, class balance."""
    input:
        unpack(evaluate_inputs),
        code=library_code("evaluate"),
    output:
        paths.metrics("{run}", "{seed}"),
    params:
        evaluate=config["evaluate"],
        resolution=config["train"]["resolution"],
    log:
        paths.log("evaluate", "{run}_s{seed}"),
    threads: SMALL_JOB_THREADS
    resources:
        mem_mb=8000,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/evaluate.py"
