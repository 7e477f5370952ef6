# diffprune: `make run` runs the default study, `make test` the test suite. Both set up .venv.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data-deps slurm-up slurm-down run study-evidence study-gpu study-latent test lint bench dvc.yaml dvc-repro push pull help
help:  ## list the targets
	@grep -E '^[a-z.-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP) data-deps  ## create .venv and install diffprune with every dependency

# torch and torchvision first and pinned: an unpinned torch pulled in by another package can
# fetch a different multi-GB build (see ../shared/offline.md).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data-deps:  ## Fashion-MNIST from Debian's dataset-fashion-mnist when apt is available as root
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else \
		echo "Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist'," \
		     "or set data.path in params.yaml to a folder with the four .gz files" \
		     "(with data.download: true the official files are fetched and checksummed)."; \
	fi

# dvc.yaml is generated from the Snakefile for params.yaml's grid (one stage per Snakemake job):
# run this after changing study, skew.arms, evaluate.features, train.space or report.*.
dvc.yaml: setup  ## regenerate dvc.yaml from the Snakemake workflow and params.yaml
	$(BIN)/python -m diffprune dvc-yaml

# dvc commit rewrites the files it caches (same content, new times); --touch then tells Snakemake
# that its outputs are still up to date, so neither tool recomputes anything.
run: setup dvc.yaml  ## run the default study (Snakemake), then record it in DVC without recomputing
	$(BIN)/snakemake --cores all
	$(BIN)/dvc commit --force --quiet
	$(BIN)/snakemake --cores all --touch --quiet

study-evidence: setup  ## every cluster rule, random and the score methods at two ratios, 3 seeds (CPU)
	$(BIN)/snakemake --cores all --configfile workflow/studies/evidence.yaml

study-latent: setup  ## the paper's model family at CPU size: conditional DiT on learnt latents
	$(BIN)/snakemake --cores all --configfile workflow/studies/latent.yaml

study-gpu: setup  ## the evidence grid with 5 seeds and longer training on one GPU
	$(BIN)/snakemake --cores all --resources gpu=8 \
		--configfile workflow/studies/evidence.yaml workflow/studies/gpu.yaml

# A one-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) on this machine, as root
# from Debian packages; state in $$SLURM_LOCAL_DIR (default /tmp/diffprune-slurm). For the tests and
# for trying workflow/profiles/slurm-local; `make slurm-down` stops every daemon it started.
slurm-up:  ## start a one-node SLURM cluster here (root + apt): for workflow/profiles/slurm-local
	tests/slurm/cluster.sh up

slurm-down:  ## stop the daemons that `make slurm-up` started
	tests/slurm/cluster.sh down

# One pytest worker per core, each test file on one worker (its module fixtures built once):
# one pytest process kept the load near 1 on 2 cores (most tests wait on a subprocess). The
# longest files go first (tests/conftest.py: LONGEST_FIRST), not the files with most tests.
test: setup  ## run the test suite
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

lint: setup  ## ruff + snakemake --lint
	$(BIN)/ruff check diffprune tests workflow/scripts
	$(BIN)/ruff format --check diffprune tests workflow/scripts
	$(BIN)/snakemake --lint

bench: setup  ## every benchmark against its baseline, one table: results/bench/bench.{csv,md}
	$(BIN)/python benchmarks/run.py

# DVC compares contents, Snakemake times: a stage whose outputs came out byte-identical stops DVC
# there, while Snakemake would still rerun what follows. --touch tells Snakemake it is current.
dvc-repro: setup dvc.yaml  ## the same study through DVC (one job at a time, each on all cores)
	$(BIN)/dvc repro
	$(BIN)/snakemake --cores all --touch --quiet

# The remote is .dvc/config's `storage` (../diffprune-dvc-remote unless `dvc remote modify --local`
# points it elsewhere). DVC's run cache stays empty: dvc.yaml's outputs persist
# (see docs/snakemake-and-dvc.md).
push: setup  ## send every DVC-tracked artifact to the DVC remote
	$(BIN)/dvc push

# dvc pull writes the artifacts with new modification times; --touch tells Snakemake they are up to
# date (as after `make run`), so neither tool recomputes anything.
pull: setup  ## fetch every artifact of this commit from the DVC remote; nothing left to rerun
	$(BIN)/dvc pull
	$(BIN)/snakemake --cores all --touch --quiet
