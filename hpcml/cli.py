"""The ``hpcml`` command line."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from hpcml.errors import UsageError, one_line
from hpcml.preemption import catch_early_usr1

if TYPE_CHECKING:
    from hpcml.slurm.spec import Spec

SET_HELP = "Override a job-file value, e.g. --set train.lr=0.1 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcml")
def cli() -> None:
    """hpcml: MPI-native distributed machine learning. Launch under mpiexec/srun for >1 rank."""


@cli.command()
@click.argument("job_file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", default=None, metavar="RUN_DIR",
              help="Continue the run in this run directory from its last checkpoint.")
@click.option("--allow-config-change", is_flag=True,
              help="With --resume: accept a config that differs from the checkpoint's (each "
                   "segment's config is kept in the run directory).")
def run(job_file: str, overrides: tuple[str, ...], resume: str | None,
        allow_config_change: bool) -> None:
    """Run the job described by JOB_FILE (TOML)."""
    from hpcml.launch import execute

    execute(job_file, overrides=overrides, resume=resume,
            allow_config_change=allow_config_change)


@cli.command()
@click.argument("name")
@click.argument("job_file", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def bench(name: str, job_file: str | None, overrides: tuple[str, ...]) -> None:
    """Run benchmark NAME (e.g. collectives) with its defaults or JOB_FILE."""
    from hpcml.jobs import bench_names
    from hpcml.launch import execute

    if name not in bench_names():
        raise UsageError(f"NAME: unknown benchmark {name!r}; choose from "
                         f"{', '.join(bench_names())} (e.g. hpcml bench collectives)")
    execute(job_file, kind=f"bench-{name}", overrides=overrides)


@cli.command(context_settings={"ignore_unknown_options": False,
                                "allow_interspersed_args": False})
@click.option("-np", "--num-proc", "np", type=int, required=True, metavar="N",
              help="Number of ranks.")
@click.option("-H", "--hosts", default=None, metavar="HOST:SLOTS,...",
              help="Hosts and their slots, e.g. node1:4,node2:4.")
@click.option("--verbose", is_flag=True, help="Print the mpiexec line first.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def horovodrun(np: int, hosts: str | None, verbose: bool, command: tuple[str, ...]) -> None:
    """Horovod's launcher: run COMMAND (e.g. python train.py) on N ranks with the embedded
    mpiexec."""
    from hpcml.horovodrun import horovodrun as run_it

    raise SystemExit(run_it(np, hosts, command, verbose))


@cli.command()
def info() -> None:
    """MPI library, ranks, hosts, threads and versions as this job sees them."""
    import json

    from hpcml.comm import abort_on_error, world
    from hpcml.runtime import configure_threads, environment

    with abort_on_error():
        comm = world()
        configure_threads(comm, 0)
        env = environment(comm)
        if comm.rank == 0:
            click.echo(json.dumps(env, indent=1))


@cli.command(name="kinds")
def kinds() -> None:
    """List the job kinds a job file may name."""
    from hpcml.jobs import describe

    click.echo(describe())


RESOURCE_OPTIONS = [
    click.option("--nodes", type=int, default=None, help="#SBATCH --nodes"),
    click.option("--ntasks-per-node", type=int, default=None, help="MPI ranks per node"),
    click.option("--time", "time_", default=None, help="time limit, e.g. 00:30:00"),
    click.option("--partition", default=None, help="Slurm partition"),
    click.option("--account", default=None, help="Slurm account"),
    click.option("--template", default=None,
                 help="single, multi-node, array or scaling (default: chosen from the file)"),
]


def _resource_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(RESOURCE_OPTIONS):
        fn = opt(fn)
    return fn


def _spec(job_file: str, nodes: int | None, ntasks_per_node: int | None, time_: str | None,
          partition: str | None, account: str | None, template: str | None) -> Spec:
    from hpcml.slurm.spec import load

    return load(job_file, {"nodes": nodes, "ntasks_per_node": ntasks_per_node, "time": time_,
                           "partition": partition, "account": account, "template": template})


@cli.group()
def slurm() -> None:
    """Render and submit sbatch scripts (templates: single, multi-node, array, scaling)."""


@slurm.command(name="render")
@click.argument("job_file")
@_resource_options
def slurm_render(job_file: str, **resources: object) -> None:
    """Print the sbatch script for JOB_FILE (a submission file or a plain job file)."""
    from hpcml.slurm.render import render

    click.echo(render(_spec(job_file, **resources)), nl=False)


@slurm.command(name="submit")
@click.argument("job_file")
@_resource_options
def slurm_submit(job_file: str, **resources: object) -> None:
    """Render JOB_FILE, save the script and sbatch it; prints the job id."""
    from hpcml.slurm.submit import SubmitError, submit

    spec = _spec(job_file, **resources)
    try:
        done = submit(spec)
    except SubmitError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    click.echo(done.job_id)
    click.echo(f"hpcml: script {done.script}; results under {done.results}", err=True)


@cli.group()
def sweep() -> None:
    """Inspect and gather job-array sweeps (directories printed by `hpcml slurm submit`)."""


@sweep.command(name="status")
@click.argument("sweep_dir", type=click.Path(file_okay=False))
def sweep_status(sweep_dir: str) -> None:
    """One line per point: index, state, values, run directory."""
    from hpcml.slurm.sweep import point_overrides, point_states

    for rec in point_states(sweep_dir):
        values = " ".join(point_overrides(rec["point"]))
        click.echo(f"{rec['index']:>4}  {rec['state']:<10} {values}  {rec['run_dir']}")


@sweep.command(name="collect")
@click.argument("sweep_dir", type=click.Path(file_okay=False))
def sweep_collect(sweep_dir: str) -> None:
    """Write SWEEP_DIR/sweep.csv and sweep.md; exit 1 naming any missing or failed point."""
    from pathlib import Path

    from hpcml.rundir import atomic_write
    from hpcml.slurm.sweep import collect

    _, csv_text, md, problems = collect(sweep_dir)
    atomic_write(Path(sweep_dir, "sweep.csv"), csv_text)
    atomic_write(Path(sweep_dir, "sweep.md"), md + "\n")
    click.echo(md)
    for line in problems:
        click.echo(f"hpcml: not complete: {line}", err=True)
    if problems:
        raise SystemExit(1)


@cli.group()
def report() -> None:
    """Reports from finished run directories."""


@report.command(name="scaling")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--bench", multiple=True, type=click.Path(file_okay=False),
              help="run directory of `hpcml bench collectives` (>= 2 ranks) for the "
                   "alpha-beta projection; repeat to fit the rows of several runs of one P")
@click.option("--mode", type=click.Choice(["weak", "strong"]), default=None,
              help="scaling mode (default: what the runs report)")
@click.option("--max-ranks", type=click.IntRange(min=2), default=1200, show_default=True,
              help="project efficiency up to this many ranks")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="output directory (default: beside the first run, scaling-report/)")
def report_scaling(runs: tuple[str, ...], bench: tuple[str, ...], mode: str | None,
                   max_ranks: int, out: str | None) -> None:
    """Efficiency table, plot and alpha-beta projection from a scaling series RUNS."""
    from pathlib import Path

    from hpcml import extras

    extras.require("plots", what="hpcml report scaling")
    from hpcml.report import output
    from hpcml.report.scaling import build_table, fit_bench, measure, series_mode

    series = [measure(r) for r in runs]
    if len({m.ranks for m in series}) != len(series):
        raise UsageError("RUNS: two runs have the same rank count; give one run per P")
    mode = series_mode(series, mode)
    model = fit_bench(*bench) if bench else None
    rows = build_table(series, mode, model, max_ranks)
    target = Path(out) if out else Path(runs[0]).resolve().parent / "scaling-report"
    output.check_out(target)
    click.echo(output.write(target, series, model, rows, mode), nl=False)
    click.echo(f"report in {target}", err=True)


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"hpcml: error: {one_line(message)}", err=True)
    raise SystemExit(code)


def main() -> None:
    """The ``hpcml`` command. Bad input of any kind, hpcml's (:class:`UsageError`) or click's
    own (an unknown command or option, a missing argument), prints one line
    ``hpcml: error: ...`` and exits 2; ``--help`` and ``--version`` exit 0."""
    catch_early_usr1()
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # `hpcml` or a group alone: its help
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.UsageError as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
        _fail(exc.format_message().rstrip(".") + hint)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        _fail("aborted", 1)
    except UsageError as exc:
        _fail(str(exc))
    raise SystemExit(code if isinstance(code, int) else 0)
