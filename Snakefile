# diffprune: the data-pruning study as a cached workflow.
#   download -> embed -> cluster | surrogate -> score -> select -> train -> sample -> evaluate -> report
#   (train.space: latent adds autoencoder -> encode before train)
# Run `snakemake --cores all`; every path comes from diffprune.paths, every setting from params.yaml.

# Params are data: refuse YTE templating (Snakemake's config reader would run its code), a key
# written twice and YAML aliases before Snakemake reads the files (diffprune.params_yaml).
from diffprune.params_yaml import check_files

check_files(["params.yaml", *workflow.overwrite_configfiles])


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/latent.smk"
include: "workflow/rules/scores.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/skew.smk"


rule all:
    input:
        rules.report.output,
        rules.skew_report.output,


rule skew:
    """Only the fairness study: `snakemake --cores all skew`."""
    input:
        rules.skew_report.output,
