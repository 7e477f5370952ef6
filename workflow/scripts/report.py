"""Snakemake script for rule `report`: results tables, plots and the sample mosaic."""

from pathlib import Path

from diffprune.logs import setup
from diffprune.report import write_report

setup(snakemake.log[0])
out = snakemake.output
cfg = snakemake.params.report
write_report(
    snakemake.input.metrics,
    metrics=cfg["metrics"],
    headline=cfg["metric"],
    floor=cfg["floor"],
    claims=cfg["claims"],
    skew_csv=snakemake.input.skew,
    clusters_meta=snakemake.input.clusters_meta[0] if snakemake.input.clusters_meta else None,
    sample_grids=[(Path(grid).stem, grid) for grid in snakemake.input.grids],
    tables_dir=Path(out.tables[0]).parent,
    plots_dir=Path(out.cost).parent,
    report_md=out.markdown,
    claims_md=out.claims_md,
    claims_csv=out.claims_csv,
    summary_csv=out.summary,
    mosaic_png=out.mosaic,
)
