"""Slurm integration: local test cluster, templates, submission, sweeps, preemption."""
