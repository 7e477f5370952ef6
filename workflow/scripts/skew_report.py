"""Snakemake script for rule `skew_report`: the fairness study's table and class-share plot."""

from diffprune import io
from diffprune.logs import setup
from diffprune.skew_report import write_skew_report

setup(snakemake.log[0])
out = snakemake.output
write_skew_report(
    snakemake.input.metrics,
    snakemake.input.manifests,
    index=snakemake.input.index,
    class_names=io.load_json(snakemake.input.store_meta).get("class_names"),
    minority_classes=snakemake.params.skew["minority_classes"],
    table_csv=out.csv,
    table_md=out.md,
    plot_png=out.plot,
)
