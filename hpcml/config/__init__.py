"""Typed job-file schemas: TOML in, validated dataclasses out."""

from hpcml.config.schema import (
    JobConfig,
    apply_overrides,
    build,
    load_job_file,
    option,
    read_toml,
    to_dict,
)

__all__ = ["JobConfig", "apply_overrides", "build", "load_job_file", "option", "read_toml",
           "to_dict"]
