"""hpcml: an MPI-native toolkit for distributed machine-learning research on HPC clusters."""

__version__ = "0.1.0"
