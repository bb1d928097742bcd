"""``hpcml slurm submit``: render, save the script, call ``sbatch``, record what was submitted.

When ``sbatch`` refuses (unknown partition, impossible resources, bad account or time) its own
message is printed verbatim, followed by one ``hpcml: hint:`` line saying what to change, and the
command exits 2, leaving no files behind.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from hpcml.slurm.render import render
from hpcml.slurm.spec import Spec
from hpcml.slurm.sweep import write_manifest

HINTS = (
    ("invalid partition", "list the partitions with `sinfo -s` and set [slurm] partition or "
                          "--partition to one of them"),
    ("invalid account", "use an account `sacctmgr show assoc user=$USER` lists, or leave "
                        "--account empty for your default"),
    ("time limit", "shorten --time to the partition's limit (`sinfo -o '%P %l'`)"),
    ("node count", "ask for at most the nodes the partition has (`sinfo -o '%P %D'`): lower "
                   "--nodes"),
    ("requested node configuration is not available",
     "ask for at most the CPUs a node has (`sinfo -o '%P %c %D'`): lower --ntasks-per-node or "
     "cpus_per_task, or set overcommit = true"),
    ("more processors requested than permitted",
     "ask for at most the CPUs the partition has (`sinfo -o '%P %c %D'`): lower --nodes or "
     "--ntasks-per-node"),
)
FALLBACK = ("sbatch refused the script; fix the [slurm] value its message names (read the script "
            "with `hpcml slurm render {source}`)")


class SubmitError(Exception):
    """sbatch refused; ``str()`` is its message verbatim plus one hint line."""


def hint(message: str, source: str) -> str:
    """hpcml's one-line advice for an sbatch error message (pure)."""
    low = message.lower()
    for needle, text in HINTS:
        if needle in low:
            return text
    return FALLBACK.format(source=source)


@dataclass
class Submitted:
    job_id: str
    script: Path
    results: Path


def submit(spec: Spec, workdir: Path | None = None) -> Submitted:
    """Render ``spec``, save the script under ``[slurm] runs_dir`` and ``sbatch`` it.

    Raises ``SubmitError`` when sbatch refuses, ``FileNotFoundError`` without sbatch and
    ``UsageError`` (nothing written) when the script cannot be rendered safely."""
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch not found on PATH (load the Slurm module or run on a "
                                "login node)")
    text = render(spec, workdir)  # refuses a bad working directory before anything is written
    runs = Path(spec.slurm.runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    script = runs / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{spec.template}.sbatch"
    script.write_text(text)
    res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         cwd=workdir)
    if res.returncode != 0:
        script.unlink()
        message = (res.stderr or res.stdout).rstrip()
        raise SubmitError(f"{message}\nhpcml: hint: {hint(message, spec.source.name)}")
    job_id = res.stdout.strip().split(";")[0]
    results = runs / f"{spec.name}-{job_id}"
    if spec.template == "array":
        results.mkdir(parents=True, exist_ok=True)
        write_manifest(results, {"job_id": job_id, "script": str(script), "job": str(spec.job),
                                 "submit_file": str(spec.source), "sets": spec.sets,
                                 "grid": spec.sweep, "points": spec.points})
    return Submitted(job_id=job_id, script=script, results=results)
