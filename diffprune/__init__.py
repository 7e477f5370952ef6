"""diffprune: data pruning for diffusion models as a reproducible, cached workflow."""

__version__ = "0.1.0"
