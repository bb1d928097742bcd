"""The ``hpcml`` command line."""

from __future__ import annotations

import click

from hpcml.errors import UsageError

SET_HELP = "Override a job-file value, e.g. --set train.lr=0.1 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcml")
def cli() -> None:
    """hpcml: MPI-native distributed machine learning. Launch under mpiexec/srun for >1 rank."""


@cli.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this run directory from its last checkpoint.")
def run(job_file: str, overrides: tuple[str, ...], resume: str | None) -> None:
    """Run the job described by JOB_FILE (TOML)."""
    from hpcml.launch import execute

    execute(job_file, overrides=overrides, resume=resume)


@cli.command()
@click.argument("name")
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def bench(name: str, job_file: str | None, overrides: tuple[str, ...]) -> None:
    """Run benchmark NAME (e.g. collectives) with its defaults or JOB_FILE."""
    from hpcml.jobs import bench_names
    from hpcml.launch import execute

    if name not in bench_names():
        raise click.BadParameter(f"unknown benchmark {name!r}; choose from {bench_names()}",
                                 param_hint="NAME")
    execute(job_file, kind=f"bench-{name}", overrides=overrides)


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


def main() -> None:
    try:
        cli.main(standalone_mode=True)
    except UsageError as exc:
        click.echo(f"hpcml: error: {exc}", err=True)
        raise SystemExit(2) from None
