"""Snakemake script for rule `report`: results tables and plots."""

from diffprune.logs import setup
from diffprune.report import write_report

setup(snakemake.log[0])
table_csv, table_md, plot_png, summary_csv = snakemake.output
write_report(
    snakemake.input.metrics,
    metric=snakemake.params.report["metric"],
    table_csv=table_csv,
    table_md=table_md,
    plot_png=plot_png,
    summary_csv=summary_csv,
)
