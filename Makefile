# hpcml: the two commands.
#   make demo   creates .venv, installs hpcml with MPI from PyPI wheels, runs the main job on 4 ranks
#   make test   creates/reuses .venv, installs the dev dependencies, runs the whole test suite
#
# Cluster overrides (see README "Using your site MPI and torch"):
#   make test MPI=system        build mpi4py against the `mpicc` on PATH instead of the mpich wheel
#   make test TORCH=            keep the torch that the interpreter already sees (venv made with
#                               --system-site-packages), e.g. a site CUDA build from `module load`
#   make demo MPIEXEC="srun"    launch with the site launcher
#   make demo TORCH_PIP="--index-url URL"   extra pip options for torch (e.g. a CPU-only index)

PYTHON ?= python3.11
VENV ?= .venv
MPI ?= wheel
TORCH ?= torch==2.13.0
TORCH_PIP ?=
NP ?= 4
DEMO_JOB ?= jobs/transformer-nmt.toml

BIN := $(VENV)/bin
MPIEXEC ?= $(BIN)/mpiexec
SITE := $(if $(TORCH),,--system-site-packages)
MPI_PKGS := $(if $(filter system,$(MPI)),--no-binary=mpi4py mpi4py,mpi4py mpich)

.PHONY: install dev demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(SITE) $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q $(TORCH_PIP) "$(TORCH)")
	$(BIN)/python -m pip install -q $(MPI_PKGS)
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

demo: install
	$(MPIEXEC) -n $(NP) $(BIN)/hpcml run $(DEMO_JOB)

test: dev
	$(BIN)/python -m pytest

lint: dev
	$(BIN)/ruff check hpcml tests examples

clean:
	rm -rf $(VENV) runs build *.egg-info
