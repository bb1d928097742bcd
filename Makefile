# hpcml: the two commands.
#   make demo   creates .venv, installs hpcml with MPI from PyPI wheels, runs the main job on 4 ranks
#   make test   creates/reuses .venv, installs the dev dependencies, runs the whole test suite
#               (which also builds the docs and runs every code block of README.md and docs/)
#   make docs   builds the documentation site into build/docs (Sphinx + MyST, warnings are errors)
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

.PHONY: install dev demo test lint docs clean horovod

$(BIN)/python:
	$(PYTHON) -m venv $(SITE) $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q $(TORCH_PIP) "$(TORCH)")
	$(BIN)/python -m pip install -q $(MPI_PKGS)
	$(BIN)/python -m pip install -q -e ".[all]"
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

docs: dev
	$(BIN)/python -m sphinx -E -W --keep-going -q -b html docs build/docs

lint: dev
	$(BIN)/ruff check hpcml tests examples

# Horovod 0.28.1 (the last PyPI release, 2023) as the peer of `hpcml bench reduction`: built from
# its sdist against this venv's torch and MPI (MPI-only: no Gloo, TensorFlow or MXNet). Two local
# patches of the unpacked sdist, nothing committed: its CMakeLists pin C++14 where torch 2.x
# headers need C++17, and CMake >= 4 refuses its cmake_minimum_required without
# CMAKE_POLICY_VERSION_MINIMUM. Takes a few minutes on 2 cores; CI does not build it.
HOROVOD ?= 0.28.1
HOROVOD_SRC := build/horovod-$(HOROVOD)

horovod: install
	rm -rf $(HOROVOD_SRC) && mkdir -p build
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: horovod==$(HOROVOD) -d build
	tar -xzf build/horovod-$(HOROVOD).tar.gz -C build
	sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
		$(HOROVOD_SRC)/CMakeLists.txt $(HOROVOD_SRC)/horovod/torch/CMakeLists.txt
	$(BIN)/python -m pip install -q setuptools wheel cmake
	PATH="$(abspath $(BIN)):$$PATH" CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j$$(nproc) \
	HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
	HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_GLOO=1 HOROVOD_CPU_OPERATIONS=MPI \
		$(BIN)/python -m pip install --no-build-isolation $(HOROVOD_SRC)
	$(BIN)/python -c "import horovod, horovod.torch as hvd; print('horovod', horovod.__version__, 'MPI', hvd.mpi_built())"

clean:
	rm -rf $(VENV) runs build *.egg-info
