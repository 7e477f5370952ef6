"""Tests run single-threaded: tiny models gain nothing from threads, and threads oversubscribe the
2-core CI machine while the end-to-end tests' Snakemake jobs run beside them."""

import torch
from threadpoolctl import threadpool_limits

torch.set_num_threads(1)
threadpool_limits(1)
