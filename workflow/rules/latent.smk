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


ENCODE_SHARDS = with_defaults("autoencoder", config["autoencoder"])["encode_shards"]
AUTOENCODER_GPU = 1 if config["autoencoder"]["device"] != "cpu" else 0


if ENCODE_SHARDS == 1:

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

else:

    rule encode_shard:
        """autoencoder.encode_shards > 1: one contiguous slice of whole batches, one GPU per job.
        Temporary: once gathered, a shard is not kept."""
        input:
            autoencoder=paths.autoencoder(),
            images=paths.store_images("train"),
            code=library_code("encode_shard"),
        output:
            latents=temp(paths.latents_shard("{shard}", ENCODE_SHARDS)),
            meta=temp(paths.latents_shard_meta("{shard}", ENCODE_SHARDS)),
        params:
            autoencoder=config["autoencoder"],
            resolution=config["train"]["resolution"],
        log:
            paths.log("encode", "shard{shard}"),
        wildcard_constraints:
            shard=r"\d+",
        threads: workflow.cores
        resources:
            mem_mb=8000,
            gpu=AUTOENCODER_GPU,
        conda:
            "../envs/diffprune.yaml"
        script:
            "../scripts/encode_shard.py"

    rule encode_gather:
        """The shards' rows into the latents file rule encode writes (the same bytes)."""
        input:
            latents=[paths.latents_shard(i, ENCODE_SHARDS) for i in range(ENCODE_SHARDS)],
            metas=[paths.latents_shard_meta(i, ENCODE_SHARDS) for i in range(ENCODE_SHARDS)],
            code=library_code("encode_gather"),
        output:
            latents=paths.latents(),
            meta=paths.latents_meta(),
        log:
            paths.log("encode", "gather"),
        resources:
            mem_mb=2000,
        conda:
            "../envs/diffprune.yaml"
        script:
            "../scripts/encode_gather.py"
