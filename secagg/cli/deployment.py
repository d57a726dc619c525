"""A deployment's commands: ``secagg server``, ``secagg client``, ``secagg status`` and
``secagg abort``."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import click

from secagg.cli.console import _progress, _summary
from secagg.cli.group import main
from secagg.cli.options import (
    _HE_PRECISION,
    _MASKING_HELP,
    _default,
    _epilog,
    _friendly,
    _optimization,
)
from secagg.config import (
    RunConfig,
    load_job,
    with_overrides,
)
from secagg.crypto.packing import WIDE as HE_LIMIT
from secagg.errors import SecAggError


@main.command(
    epilog=_epilog(
        "secagg server jobs/digits.toml --kit project/server --min-clients 2",
        "secagg server --kit project/server --he --rounds 20 --workdir runs/job",
    )
    + f"\n\nWith --he, at most {HE_LIMIT.max_clients} sites take part in a round."
)
@click.argument("job", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--kit", "kit_dir", required=True, type=click.Path(file_okay=False), help="The server kit."
)
@click.option(
    "--task",
    help="The task by import path, package.module:TaskClass; every site must be able to import it.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="Checkpoints and results; a restarted server resumes from it "
    "[default: runs/<job>-server].",
)
@click.option("--bind", help="HOST:PORT to listen on [default: all interfaces, the kit's port].")
@click.option("--rounds", type=click.IntRange(min=1), help=f"Federated rounds.{_default('rounds')}")
@click.option(
    "--he/--no-he",
    default=None,
    help=f"CKKS secure aggregation, or plaintext FedAvg.{_default('he')}",
)
@click.option("--masking/--no-masking", default=None, help=_MASKING_HELP)
@_HE_PRECISION
@click.option(
    "--min-clients", type=click.IntRange(min=0), help="Sites a round needs [default: all]."
)
@click.option(
    "--round-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help=f"Seconds each phase of a round waits for the sites.{_default('round_timeout')}",
)
@click.option(
    "--liveness",
    type=click.FloatRange(min=1),
    default=15.0,
    show_default=True,
    help="Seconds without a heartbeat before a site is taken for gone.",
)
@click.option("--tracking-uri", help="MLflow tracking URI [default: sqlite:///mlflow.db].")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--experiment", help=f"MLflow experiment name.{_default('experiment')}")
@_optimization
@_friendly
def server(
    job: str | None,
    kit_dir: str,
    workdir: str | None,
    bind: str | None,
    liveness: float,
    no_tracking: bool,
    **flags: Any,
) -> None:
    """Serve a job (JOB.toml, flags override it) to the sites of a provisioned project."""
    from secagg.deploy import serve

    config = load_job(job) if job else RunConfig()
    config = with_overrides(config, **flags, tracking=False if no_tracking else None)
    result = serve(
        kit_dir,
        config,
        workdir,
        bind,
        liveness,
        on_round=_progress(config.rounds, bool(config.he), lead=config.headline),
        log=click.echo,
    )
    _summary(result, model=False)  # the server cannot decrypt: it holds no model


@main.command(
    epilog=_epilog(
        "secagg client --kit project/site-1 --data-dir /data",
        "secagg client --kit project/site-2 --data-dir /data/site-2 --shard all --device cuda",
    )
)
@click.option(
    "--kit", "kit_dir", required=True, type=click.Path(file_okay=False), help="This site's kit."
)
@click.option(
    "--data-dir",
    default="data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="This site's data, handed to the task.",
)
@click.option(
    "--download/--no-download",
    default=False,
    show_default=True,
    help="Let torchvision download the dataset (needs network).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="The site's model.pt and metrics.json [default: runs/<job>-<site>].",
)
@click.option(
    "--shard",
    type=click.Choice(["auto", "all"]),
    default="auto",
    show_default=True,
    help="auto: the job's Dirichlet shard for this site; all: every example in --data-dir.",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Seconds to keep retrying while the server is not up.",
)
@_friendly
def client(
    kit_dir: str,
    data_dir: str,
    download: bool,
    device: str,
    workdir: str | None,
    shard: str,
    wait: float,
) -> None:
    """Take part in a job as one site: train when asked, keep the global model locally."""
    from secagg.deploy import participate

    def log(line: str) -> None:
        click.echo(f"[{time.strftime('%H:%M:%S')}] {line}")

    outcome = participate(kit_dir, data_dir, download, device, workdir, shard, wait, log)
    if outcome != "done":
        raise SecAggError(f"the job ended unfinished: {outcome}")
    log("the job is done")


@main.command(
    epilog=_epilog("secagg status --kit project/admin", "secagg status --kit project/admin --json")
)
@click.option(
    "--kit", "kit_dir", required=True, type=click.Path(file_okay=False), help="The admin kit."
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@_friendly
def status(kit_dir: str, as_json: bool) -> None:
    """Show the job's state: round, connected sites, last metrics (admin kit)."""
    from secagg.deploy import admin_call

    info = admin_call(kit_dir, "Status", {})
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(
        f"project {info['project']}, job {info['job']} ({info['job_id'][:12]}): "
        f"{info['completed']}/{info['rounds']} rounds done; {info['phase']}"
    )
    if info.get("aborted"):
        click.echo(f"  aborted: {info['aborted']}")
    for site in info["sites"]:
        state = "connected" if site["connected"] else "not connected"
        line = f"  {site['name']:<16} {state:<14} round {site['applied']}"
        if site.get("error"):
            line += f"  failed: {site['error']}"
        click.echo(line)
    from secagg.labels import headline

    for row in info["history"]:
        value = row.get("value")
        click.echo(
            f"  round {row['round']:>3}: "
            f"{headline(row.get('metric', 'metric'), math.nan if value is None else value)}, "
            f"{row['clients']} sites"
        )
    for line in info.get("refusals", []):
        click.echo(f"  refused: {line}")


@main.command(epilog=_epilog('secagg abort --kit project/admin --reason "maintenance"'))
@click.option(
    "--kit", "kit_dir", required=True, type=click.Path(file_okay=False), help="The admin kit."
)
@click.option(
    "--reason",
    default="no reason given",
    show_default=True,
    help="What the server tells every site (after 'aborted by the administrator: ').",
)
@_friendly
def abort(kit_dir: str, reason: str) -> None:
    """Stop the job: the server tells every site and exits (admin kit)."""
    from secagg.deploy import admin_call

    admin_call(kit_dir, "Abort", {"reason": reason})
    click.echo(f"abort sent: {reason}")
