"""``secagg server``: serve a job to the sites of a provisioned project."""

from __future__ import annotations

from typing import Any

import click

from secagg.cli.console import _progress, _summary
from secagg.cli.group import main
from secagg.cli.options import (
    _HE_PRECISION,
    _MASKING,
    _ROUNDS,
    _default,
    _dp_settings_need_dp,
    _epilog,
    _friendly,
    _optimization,
    _privacy,
    _tracking,
)
from secagg.config import RunConfig, load_job, with_overrides
from secagg.crypto.packing import WIDE as HE_LIMIT


@main.command(
    epilog=_epilog(
        "secagg server jobs/digits.toml --kit project/server --he --min-clients 2",
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
@_ROUNDS
@click.option(
    "--he/--no-he",
    default=None,
    help=f"CKKS secure aggregation, or plaintext FedAvg.{_default('he')}",
)
@_MASKING
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
@_tracking
@_optimization
@_privacy
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
    _dp_settings_need_dp(config, flags)
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
