"""``secagg run``: a whole job in one process (or over Ray, or gRPC on this machine), with a
progress bar, a line per round and a summary; ``--resume`` goes on with an interrupted run."""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from secagg.cli.console import _Bar, _progress, _summary
from secagg.cli.group import main
from secagg.cli.options import (
    _HE_PRECISION,
    _MASKING,
    _ROUNDS,
    _default,
    _dp_settings_need_dp,
    _friendly,
    _optimization,
    _privacy,
    _tracking,
)
from secagg.config import (
    DATASETS,
    MODELS,
    OPTIMIZERS,
    TRANSPORTS,
    RunConfig,
    load_job,
    with_overrides,
)
from secagg.crypto.packing import WIDE as HE_LIMIT

_RUN_EPILOG = f"""\b
Examples:
  secagg keygen && secagg run --he --clients 8        HE on the digits job
  secagg run jobs/cifar10_fedavg_he.toml --download   a job file; flags override it
  secagg run --resume --output runs/<run> --rounds 20 go on with an interrupted run

With --he, at most {HE_LIMIT.max_clients} clients take part in a round (the CKKS noise budget).
Each round prints the task's metrics (the job's --metric first), loss, seconds, MB sent up
and down (HE: the seconds spent encrypting, adding and decrypting); on a terminal a progress
bar shows the phase and the run's ETA; --quiet leaves only the summary. Errors are one line,
exit 1 (2 for a bad flag)."""


@main.command(epilog=_RUN_EPILOG)
@click.argument("job", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--he/--no-he",
    default=None,
    help=f"CKKS secure aggregation, or plaintext FedAvg; HE takes at most "
    f"{HE_LIMIT.max_clients} clients per round.{_default('he')}",
)
@_MASKING
@_HE_PRECISION
@click.option(
    "--task",
    help="Your task by import path, package.module:TaskClass (default: the built-in "
    "classification of --dataset and --model). Its settings go in the job file's "
    "[task_settings] table.",
)
@click.option(
    "--initial-model",
    type=click.Path(dir_okay=False),
    help="A state dict every party starts from (torch.save(model.state_dict(), path)) "
    "[default: the task's seeded weights]",
)
@click.option(
    "--clients",
    type=click.IntRange(min=1),
    help=f"Clients in the job: the population (with --he at most {HE_LIMIT.max_clients} per "
    f"round).{_default('clients')}",
)
@click.option(
    "--clients-per-round",
    type=click.IntRange(min=0),
    help="Clients drawn to take part in each round, from the job's seed; with --he at most "
    f"{HE_LIMIT.max_clients} [default: 0, every client].",
)
@_ROUNDS
@click.option(
    "--local-epochs",
    type=click.IntRange(min=1),
    help=f"Epochs each client trains per round.{_default('local_epochs')}",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), help=f"Batch size.{_default('batch_size')}"
)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    help=f"Local optimizer, fresh each round (sgd: momentum 0.9).{_default('optimizer')}",
)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), help=f"Learning rate.{_default('lr')}"
)
@click.option(
    "--metric",
    help="The metric to lead with: one the task's evaluate reports, or loss [default: "
    "accuracy for the built-in task, loss for your own].",
)
@click.option(
    "--alpha",
    type=click.FloatRange(min=0, min_open=True),
    help=f"Dirichlet label skew; large values approach IID.{_default('alpha')}",
)
@click.option(
    "--seed", type=int, help=f"Partition, initial model and training order.{_default('seed')}"
)
@click.option(
    "--dataset", type=click.Choice(DATASETS), help=f"Built-in task's data.{_default('dataset')}"
)
@click.option(
    "--model", type=click.Choice(MODELS), help=f"Built-in task's model.{_default('model')}"
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help=f"Where datasets live.{_default('data_dir')}",
)
@click.option(
    "--download/--no-download",
    default=None,
    help=f"Let torchvision download the dataset (needs network).{_default('download')}",
)
@click.option(
    "--device",
    help=f"auto (CUDA when available), cpu, cuda, cuda:N, mps.{_default('device')}",
)
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(file_okay=False),
    help=f"Key folder (HE runs), made by secagg keygen.{_default('keys_dir')}",
)
@click.option(
    "--output",
    "output_dir",
    type=click.Path(file_okay=False),
    help="Run folder [default: runs/<time>-<job>-<he|plain>; with --resume, the newest].",
)
@_tracking
@click.option(
    "--transport",
    type=click.Choice(TRANSPORTS),
    help="inprocess: clients are objects in this process; grpc: a server process and one "
    "process per client on localhost, over mutual TLS; ray: clients are Ray actors, on a "
    f"local Ray or --ray-address (pip install 'secagg[ray]').{_default('transport')}",
)
@click.option(
    "--ray-address",
    help="ray: the Ray cluster to join, e.g. 10.0.0.5:6379 [default: start a local Ray].",
)
@click.option(
    "--client-cpus",
    type=click.FloatRange(min=0, min_open=True),
    help=f"ray: CPUs each client holds.{_default('client_cpus')}",
)
@click.option(
    "--client-gpus",
    type=click.FloatRange(min=0),
    help=f"ray: GPUs each client holds; fractions share one (0.25: four per GPU)."
    f"{_default('client_gpus')}",
)
@click.option(
    "--min-clients",
    type=click.IntRange(min=0),
    help="grpc, ray: clients a round needs to go on [default: all of the round].",
)
@click.option(
    "--threshold",
    type=click.IntRange(min=0),
    help="with masks: the fewest contributors any sum a client unmasks or decrypts may have "
    "(the round policy) [default: max(min(m, 3), 2m/3 + 1) of the m clients per round].",
)
@click.option(
    "--round-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help=f"grpc: seconds each phase of a round waits for the sites.{_default('round_timeout')}",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted run in --output (or the newest in runs/) with its own "
    "settings; --rounds may extend or shorten it, other changes are refused.",
)
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress bar, no per-round lines: only the summary."
)
@_privacy
@_optimization
@_friendly
def run(job: str | None, resume: bool, no_tracking: bool, quiet: bool, **flags: Any) -> None:
    """Run a federated job: JOB is an optional TOML job file; flags override it."""
    from dataclasses import replace

    from secagg.outputs import new_output_dir

    config = load_job(job) if job else RunConfig()
    config = with_overrides(config, **flags, tracking=False if no_tracking else None).validate()
    _dp_settings_need_dp(config, flags)
    if resume:
        _resume(config, job, flags, no_tracking, quiet)
        return
    from secagg.privacy import described

    mode = "HE (CKKS)" if config.he else "plaintext FedAvg"
    where = {
        "inprocess": "in one process",
        "grpc": "over gRPC on localhost",
        "ray": f"on Ray ({config.ray_address or 'local'})",
    }[config.transport]
    what = f"task {config.task}" if config.task else f"{config.dataset}/{config.model}"
    who = f"{config.clients} clients"
    if config.per_round < config.clients:
        who += f" ({config.per_round} per round)"
    if config.dp:
        mode += f", {described(config)}"
    if not quiet:
        rounds = f"{config.rounds} round{'' if config.rounds == 1 else 's'}"
        click.echo(f"secagg run: {what}, {who}, {rounds}, {mode}, {where}")
    # Named now, so that an interrupted run can say where it is.
    config = replace(config, output_dir=str(new_output_dir(config.tracking_settings)))
    with _interrupted(Path(config.output_dir or ""), config.transport == "inprocess"):
        if config.transport == "grpc":
            from secagg.deploy import run_local

            result = run_local(config, log=(lambda line: None) if quiet else click.echo)
        else:
            with _Bar(config.rounds, 0, quiet) as bar:
                from secagg.job import run_job  # imports torch: seconds, under the bar

                on_round = _progress(config.rounds, config.he, bar.round_line, config.headline, bar)
                result = run_job(config, on_round=on_round, on_progress=bar)
    _summary(result, model=True)


def _resume(
    config: RunConfig, job: str | None, flags: dict[str, Any], no_tracking: bool, quiet: bool
) -> None:
    """``secagg run --resume``: continue a run with the settings it started with, changed only
    where a change keeps it the same job (``--rounds``, where data lives); say what changed."""
    from secagg.job import run_job
    from secagg.labels import headline
    from secagg.outputs import latest_run_dir
    from secagg.resume import plan_resume

    if config.transport == "grpc":
        raise click.UsageError("--resume is for in-process runs; a restarted server resumes")
    run_dir = Path(flags["output_dir"]) if flags["output_dir"] else latest_run_dir()
    # What the user asked for: the flags given, and a job file's settings that are not defaults.
    changes = {k: v for k, v in flags.items() if v is not None and k != "output_dir"}
    if no_tracking:
        changes["tracking"] = False
    if job:
        defaults = RunConfig()
        for key, value in load_job(job).to_dict().items():
            if key not in ("job_name", "output_dir") and value != getattr(defaults, key):
                changes.setdefault(key, value)
    plan = plan_resume(run_dir, changes)
    if plan.finished:
        click.echo(
            f"{run_dir} is finished: all {plan.config.rounds} rounds ran (final "
            f"{headline(plan.config.headline, plan.final)}); results in "
            f"{run_dir / 'results.json'}. To train on, resume with --rounds above "
            f"{plan.config.rounds}."
        )
        return
    applied = "".join(f"; {k} {old} -> {new}" for k, (old, new) in plan.changed.items())
    if not quiet:
        click.echo(
            f"resuming {run_dir}: {plan.completed} of {plan.config.rounds} rounds done{applied}"
        )
    with _interrupted(run_dir, True), _Bar(plan.config.rounds, plan.completed, quiet) as bar:
        result = run_job(
            plan.config,
            resume_dir=run_dir,
            resume_changes=changes,
            on_round=_progress(
                plan.config.rounds, plan.config.he, bar.round_line, plan.config.headline, bar
            ),
            on_progress=bar,
        )
    _summary(result, model=True)


@contextlib.contextmanager
def _interrupted(run_dir: Path, resumable: bool) -> Iterator[None]:
    """On Ctrl-C, say how to go on: the exact command that resumes the run, when it can."""
    from secagg.server import STATE_FILE

    try:
        yield
    except KeyboardInterrupt:
        if resumable and (run_dir / STATE_FILE).exists():
            command = f"secagg run --resume --output {shlex.quote(str(run_dir))}"
            click.echo(f"\ninterrupted; to continue, run: {command}", err=True)
        elif resumable:
            click.echo("\ninterrupted before the first round finished; nothing to resume", err=True)
        else:
            click.echo(f"\ninterrupted; the partial run is in {run_dir}", err=True)
        sys.exit(130)
