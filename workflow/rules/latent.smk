# The latent space of the paper's DiT (train.space: latent): an autoencoder trained on the train
# store or copied from a pretrained one, and the train store's latents, encoded once and reused
# by every run. Changing a ratio reruns neither; changing the autoencoder reruns both.


rule autoencoder:
    """diffusers AutoencoderKL (trained or pretrained) with its measured latent scale factor."""
    input:
        paths.store_images("train"),
        paths.store_index("train"),
        paths.store_meta("train"),
        code=library_code("autoencoder"),
    output:
        directory(paths.autoencoder()),
    params:
        autoencoder=config["autoencoder"],
        resolution=config["train"]["resolution"],
        checkpoints=str(paths.autoencoder_checkpoints()),
    log:
        paths.log("autoencoder"),
    threads: workflow.cores
    resources:
        mem_mb=8000,
        gpu=1 if config["autoencoder"]["device"] != "cpu" else 0,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/autoencoder.py"


rule encode:
    """Posterior means of every training image (float16, memory-mapped), computed once."""
    input:
        autoencoder=paths.autoencoder(),
        images=paths.store_images("train"),
        code=library_code("encode"),
    output:
        latents=paths.latents(),
        meta=paths.latents_meta(),
    params:
        autoencoder=config["autoencoder"],
        resolution=config["train"]["resolution"],
    log:
        paths.log("encode"),
    threads: workflow.cores
    resources:
        mem_mb=8000,
        gpu=1 if config["autoencoder"]["device"] != "cpu" else 0,
    conda:
        "../envs/diffprune.yaml"
    script:
        "../scripts/encode.py"
