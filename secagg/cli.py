"""The ``secagg`` command: click commands only, each parsing flags into one library call."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from secagg.config import (
    DATASETS,
    HE_PRECISIONS,
    LR_SCHEDULES,
    MODELS,
    OPTIMIZERS,
    SERVER_OPTIMIZERS,
    TRANSPORTS,
    RunConfig,
    load_job,
    with_overrides,
)
from secagg.crypto.packing import WIDE as HE_LIMIT
from secagg.crypto.params import CkksParams
from secagg.errors import SecAggError


def _default(name: str) -> str:
    """`` [default: x]`` for a RunConfig field, so --help shows the defaults a run really uses
    (the flags themselves default to None: 'not given', so a job file's value stands)."""
    value = getattr(RunConfig, name)
    shown = ("on" if value else "off") if isinstance(value, bool) else value
    return f" [default: {shown}]"


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


def _epilog(*examples: str) -> str:
    """A command's help epilog: example invocations, kept as written (click's \\b)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in examples)


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn secagg's named errors into one line and exit code 1; --debug shows the traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SecAggError as err:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            raise click.ClickException(str(err)) from err
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


_MASKING_HELP = (
    "With --he: pairwise masks inside the ciphertexts, so neither the server nor the server "
    "with fewer than all other clients of a round can read one client's update; sites sign "
    "their mask keys with their site certificate (deployments) and correct for sites lost "
    f"mid-round.{_default('masking')}"
)
_HE_PRECISION = click.option(
    "--he-precision",
    type=click.Choice(HE_PRECISIONS),
    help="With --he: quantization steps of 15 bits (standard, 2.6 bytes per parameter) or 23 "
    "bits (fine, 3.9 bytes per parameter; float32 plaintext: 4.0); auto: fine with a server "
    f"optimizer other than fedavg.{_default('he_precision')}",
)
_POSITIVE = click.FloatRange(min=0, min_open=True)
_FRACTION = click.FloatRange(0, 1, max_open=True)
_OPTIMIZATION = [
    click.option(
        "--server-optimizer",
        type=click.Choice(SERVER_OPTIMIZERS),
        help="The step every client takes with the decrypted average [fedavg].",
    ),
    click.option("--server-lr", type=_POSITIVE, help="Server learning rate [1.0; adaptive 0.1]."),
    click.option("--server-momentum", type=_FRACTION, help="fedavgm's momentum [0.9]."),
    click.option("--beta1", type=_FRACTION, help="Adaptive optimizers' first-moment decay [0.9]."),
    click.option("--beta2", type=_FRACTION, help="fedadam/fedyogi second-moment decay [0.99]."),
    click.option("--tau", type=_POSITIVE, help="Adaptive optimizers' adaptivity [1e-3]."),
    click.option(
        "--fedprox-mu", type=click.FloatRange(min=0), help="FedProx proximal weight [0: off]."
    ),
    click.option(
        "--lr-schedule", type=click.Choice(LR_SCHEDULES), help="Client lr across rounds [constant]."
    ),
    click.option("--lr-step-rounds", type=click.IntRange(min=1), help="step: rounds per step."),
    click.option("--lr-gamma", type=click.FloatRange(0, 1, min_open=True), help="step: factor."),
    click.option("--lr-min", type=click.FloatRange(min=0), help="cosine: the lr it tends to [0]."),
]


def _optimization(command: Callable[..., Any]) -> Callable[..., Any]:
    """The federated-optimization flags, shared by ``run`` and ``server``."""
    for option in reversed(_OPTIMIZATION):
        command = option(command)
    return command


#: ``secagg run``'s differential-privacy flags (``secagg.privacy``): name, type, help
_PRIVACY = (
    (
        "--dp-epsilon",
        click.FloatRange(min=0),
        "Differential privacy within this epsilon over the job's rounds (the noise is "
        "calibrated to it, and the run stops before exceeding it); with --he inside the "
        "encrypted sum, without it central (the server adds the noise).",
    ),
    (
        "--dp-noise",
        click.FloatRange(min=0),
        "Differential privacy with this noise multiplier instead (with --dp-epsilon too: "
        "the run stops before exceeding that budget).",
    ),
    (
        "--dp-clip",
        click.FloatRange(min=0, min_open=True),
        f"with DP: the L2 bound each client clips its update to.{_default('dp_clip')}",
    ),
    (
        "--dp-delta",
        click.FloatRange(min=0, max=1, min_open=True, max_open=True),
        f"with DP: the delta epsilon is stated at.{_default('dp_delta')}",
    ),
)


def _privacy(command: Callable[..., Any]) -> Callable[..., Any]:
    """The differential-privacy flags of ``run``."""
    for name, kind, text in reversed(_PRIVACY):
        command = click.option(name, type=kind, help=text)(command)
    return command


@click.group(
    epilog=_epilog(
        "secagg keygen && secagg run --he     HE secure aggregation on the digits job",
        "secagg run --help                    every flag of a command, with its default",
    )
)
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="secagg")
def main(debug: bool) -> None:
    """Federated learning with homomorphic-encryption secure aggregation."""
    warnings.showwarning = _note


@main.command(
    epilog=_epilog(
        "secagg keygen                          keys/ with the defaults (128-bit security)",
        "secagg keygen --out k2 --poly-degree 16384 --coeff-bits 60,60,60",
    )
)
@click.option(
    "--out",
    "out_dir",
    default="keys",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for client.ctx (secret), server.ctx and manifest.json.",
)
@click.option("--force", is_flag=True, help="Replace existing keys.")
@click.option(
    "--poly-degree",
    type=click.Choice(["2048", "4096", "8192", "16384", "32768"]),
    default="8192",
    show_default=True,
    help="CKKS polynomial modulus degree N (N/2 slots per ciphertext).",
)
@click.option(
    "--coeff-bits",
    default="60,60",
    show_default=True,
    help="Bit sizes of the coefficient-modulus primes, data primes first, special prime last; "
    "refused below 128-bit security.",
)
@_friendly
def keygen(out_dir: str, force: bool, poly_degree: str, coeff_bits: str) -> None:
    """Make CKKS keys: client.ctx (secret, for clients), server.ctx (public), manifest.json."""
    from secagg import keys

    try:
        bits = tuple(int(b) for b in coeff_bits.split(","))
    except ValueError as err:
        raise click.BadParameter(
            "give comma-separated integers, e.g. 60,60", param_hint="--coeff-bits"
        ) from err
    params = CkksParams(int(poly_degree), bits)
    keys.check_can_generate(out_dir, params, force)  # refuse before saying we generate
    click.echo(f"generating CKKS keys (N={poly_degree}, primes {list(bits)})...")
    manifest = keys.generate(out_dir, params, force=force)
    out = Path(out_dir)
    click.echo(f"  {out / keys.CLIENT_FILE}  secret context: clients only (mode 600)")
    click.echo(f"  {out / keys.SERVER_FILE}  public context: the server (no secret key)")
    click.echo(f"  {out / keys.MANIFEST_FILE}  fingerprint {manifest['fingerprint']}")


@main.command(epilog=_RUN_EPILOG)
@click.argument("job", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--he/--no-he",
    default=None,
    help=f"CKKS secure aggregation, or plaintext FedAvg; HE takes at most "
    f"{HE_LIMIT.max_clients} clients per round.{_default('he')}",
)
@click.option(
    "--masking/--no-masking",
    default=None,
    help=_MASKING_HELP,
)
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
@click.option("--rounds", type=click.IntRange(min=1), help=f"Federated rounds.{_default('rounds')}")
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
@click.option("--tracking-uri", help="MLflow tracking URI [default: sqlite:///mlflow.db].")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--experiment", help=f"MLflow experiment name.{_default('experiment')}")
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

    from secagg.records import new_output_dir

    config = load_job(job) if job else RunConfig()
    config = with_overrides(config, **flags, tracking=False if no_tracking else None).validate()
    if resume:
        _resume(config, job, flags, no_tracking, quiet)
        return
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
    if not quiet:
        click.echo(f"secagg run: {what}, {who}, {config.rounds} rounds, {mode}, {where}")
    # Named now, so that an interrupted run can say where it is.
    config = replace(config, output_dir=str(new_output_dir(config)))
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
    from secagg.records import headline, latest_run_dir, plan_resume

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


def _note(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """Library warnings (a partition that could not honour its settings...) as one line."""
    click.echo(f"note: {message}", err=True)


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


def _progress(
    total: int,
    he: bool,
    echo: Callable[[str], None] = click.echo,
    lead: str = "accuracy",
    bar: _Bar | None = None,
) -> Callable[[Any], None]:
    """One line per round: the task's evaluation metrics (``lead``, the job's headline metric,
    first), time, bytes, and for HE the time spent encrypting, adding and decrypting; the
    ``bar`` shows the headline metric from then on."""

    def show(m: Any) -> None:
        if bar is not None:
            from secagg.records import headline

            bar.latest = headline(lead, m.value(lead))
        evaluated = {k: v for k, v in m.metrics.items() if not k.startswith("train_")}
        # The job's headline metric first, then the task's others, then the loss.
        names = sorted(evaluated, key=lambda name: name != lead)
        shown = "".join(f"  {_SHORT.get(k, k)} {evaluated[k]:.4f}" for k in names)
        loss = f"  loss {m.loss:.4f}" if m.loss == m.loss else "  (not evaluated)"
        if m.epsilon == m.epsilon:  # with differential privacy: the job's epsilon so far
            loss += f"  eps {m.epsilon:.2f}"
        line = (
            f"round {m.round:>3}/{total}{shown}{loss}  {m.round_seconds:6.2f}s  "
            f"up {_mb(m.bytes_up)} down {_mb(m.bytes_down)}"
        )
        if he:
            line += (
                f"  enc {m.encrypt_seconds:.2f}s agg {m.aggregate_seconds:.2f}s "
                f"dec {m.decrypt_seconds:.2f}s"
            )
        echo(line)

    return show


_SHORT = {"accuracy": "acc"}

#: what the set-up steps before the first round are called on the progress bar
_SETUP = {
    "clients": "loading data and building clients",
    "tracking": "opening the MLflow store",
    "replay": "replaying the rounds done",
}


class _Bar:
    """What a terminal shows while a run works: the set-up (clients built, the MLflow store
    opened), then the rounds, with the current round's phase, its clients done of N and the
    run's ETA. Drawn only when stdout is a terminal, so logs and pipes keep one line per
    round; ``quiet`` also drops the per-round lines. Use as the run's ``on_progress``."""

    def __init__(self, rounds: int, done: int, quiet: bool) -> None:
        self.rounds, self.done, self.quiet = rounds, done, quiet
        #: the last round's headline metric, shown beside the phase
        self.latest = ""
        self.drawn = not quiet and sys.stdout.isatty()
        self._setup: Any = None
        self._rounds: Any = None
        if self.drawn:
            from tqdm import tqdm

            self._tqdm = tqdm
            self._setup = tqdm(
                desc="starting", bar_format="{desc} [{elapsed}]", leave=False, file=sys.stdout
            )

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in (self._setup, self._rounds):
            if bar is not None:
                bar.close()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.drawn:
            return
        if phase in _SETUP:
            self._setup.set_description_str(f"{_SETUP[phase]} {done}/{total}")
            return
        if self._rounds is None:  # the first round starts: its ETA counts from here
            self._setup.close()
            self._setup = None
            self._rounds = self._tqdm(
                total=self.rounds,
                initial=self.done,
                leave=False,
                dynamic_ncols=True,
                file=sys.stdout,
                bar_format="{desc} |{bar:30}| {n_fmt}/{total_fmt} rounds "
                "[{elapsed}, ETA {remaining}]",
            )
        self._rounds.set_description_str(
            f"round {self.done + 1}/{self.rounds}: {phase} {done}/{total}{self._latest()}"
        )

    def _latest(self) -> str:
        return f" (last round: {self.latest})" if self.latest else ""

    def round_line(self, line: str) -> None:
        """A round is over: print its line (above the bar) and move the bar on."""
        self.done += 1
        if self.quiet:
            return
        if self._rounds is None:
            click.echo(line)
            return
        self._rounds.write(line, file=sys.stdout)
        if self.done < self.rounds:
            self._rounds.set_description_str(
                f"round {self.done + 1}/{self.rounds}{self._latest()}", refresh=False
            )
        self._rounds.update(1)


def _summary(result: Any, model: bool) -> None:
    """The closing lines of a run: its headline metric, where the results went, MLflow."""
    from secagg.records import headline

    parameters = f" ({result.num_parameters:,} parameters)" if result.num_parameters else ""
    click.echo(
        f"done: final {headline(result.config.headline, result.final)} after "
        f"{len(result.rounds)} rounds in {result.seconds:.1f}s{parameters}"
    )
    click.echo(f"  results: {result.output_dir / 'results.json'}")
    if model:
        click.echo(f"  model:   {result.output_dir / 'model.pt'}")
    if result.mlflow_run_id and result.tracking_uri:
        from secagg.tracking import run_url, ui_command

        experiment = result.mlflow_experiment_id
        where = (
            run_url(result.tracking_uri, experiment, result.mlflow_run_id)
            if experiment
            else f"in {result.tracking_uri}"
        )
        click.echo(f"  MLflow:  {result.run_name or result.mlflow_run_id}  {where}")
        command = ui_command(result.tracking_uri)
        if command:
            click.echo(f"  start the UI first: {command}")


def _mb(n: float) -> str:
    return f"{n / 1e6:7.2f} MB"


# --- deployment: provision, server, client, status, abort --------------------------------------


@main.command(
    epilog=_epilog(
        "secagg provision --server fl.example.org:8443 --clients site-1,site-2 --out project",
        "secagg provision --project-file project.toml",
    )
)
@click.option(
    "--server",
    "server_address",
    help="The server's HOST[:PORT] as sites will reach it [default port: 8443].",
)
@click.option("--clients", "sites", help="Site names, comma-separated: site-1,site-2,...")
@click.option(
    "--project-file",
    type=click.Path(dir_okay=False, exists=True),
    help="A TOML file with name, server and clients, instead of the two flags.",
)
@click.option("--project", "project_name", default="secagg", show_default=True, help="Name.")
@click.option(
    "--out",
    "out_dir",
    default="project",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the CA and one kit per party.",
)
@click.option(
    "--threshold",
    type=click.IntRange(min=0),
    default=0,
    help="The fewest contributors any sum a site unmasks or decrypts may have, signed into "
    "every kit [default: max(3, 2n/3 + 1) of the n sites, at most n].",
)
@click.option(
    "--graph-above",
    type=click.IntRange(min=4),
    default=200,
    show_default=True,
    help="Rounds of more sites than this mask over a neighbour graph (each site with about "
    "2 x 80 others, not all), signed into every kit.",
)
@click.option(
    "--protection",
    type=click.Choice(["masked", "he", "plain"]),
    default="masked",
    show_default=True,
    help="The least protection every site requires of a job the server sends, signed into "
    "every kit: masked (HE with pairwise masks), he (HE), plain (any).",
)
@click.option(
    "--require-dp",
    nargs=2,
    type=click.FloatRange(min=0, min_open=True),
    metavar="NOISE CLIP",
    help="Every site requires distributed DP of at least this noise multiplier and at most "
    "this clipping bound, signed into every kit.",
)
@click.option("--force", is_flag=True, help="Replace existing kits.")
@_friendly
def provision(
    server_address: str | None,
    sites: str | None,
    project_file: str | None,
    project_name: str,
    out_dir: str,
    threshold: int,
    graph_above: int,
    protection: str,
    require_dp: tuple[float, float] | None,
    force: bool,
) -> None:
    """Make a CA, certificates, CKKS keys and one startup kit per party."""
    from secagg import provision as kits
    from secagg.crypto.neighbours import exposure

    if project_file:
        import tomllib

        spec = tomllib.loads(Path(project_file).read_text())
        server_address = spec.get("server", server_address)
        names = list(spec.get("clients", []))
        project_name = spec.get("name", project_name)
        threshold = int(spec.get("threshold", threshold))
        graph_above = int(spec.get("graph_above", graph_above))
        protection = str(spec.get("protection", protection))
    else:
        names = [name.strip() for name in (sites or "").split(",") if name.strip()]
    if not server_address or not names:
        raise click.UsageError(
            "give --server HOST[:PORT] and --clients a,b,... (or --project-file)"
        )
    click.echo(
        f"provisioning project '{project_name}': server {server_address}, {len(names)} sites"
    )
    folders = kits.provision(
        out_dir,
        server_address,
        names,
        project_name,
        force=force,
        threshold=threshold,
        graph_above=graph_above,
        protection=protection,
        dp_noise=require_dp[0] if require_dp else 0.0,
        dp_clip=require_dp[1] if require_dp else 0.0,
    )
    policy = kits.load_kit(folders["server"], "server").policy()
    click.echo(
        f"  round policy: every sum has at least {policy.threshold} of at most "
        f"{policy.max_round} sites (signed by the CA into every kit); a lying server with up "
        f"to {policy.tolerated()} colluding site(s) reads no single update"
    )
    required = {"masked": "HE with pairwise masks", "he": "HE", "plain": "nothing"}
    dp = (
        f", distributed DP (noise multiplier >= {policy.dp_noise:g}, clip <= {policy.dp_clip:g})"
        if policy.dp_noise
        else ""
    )
    click.echo(f"  every site requires of a job: {required[policy.protection]}{dp}")
    if policy.graph(len(names)):
        click.echo(
            f"  neighbour graph: each site masks with its {policy.picks} picks and those that "
            f"picked it; a lying server with a third of the sites colluding reads a given "
            f"site's update with chance {exposure(policy.picks, policy.pick_threshold, 1 / 3):.1e}"
        )
    if policy.threshold < 3:
        click.echo(
            f"  warning: with a threshold of {policy.threshold}, a sum of two is decrypted, and "
            "each of its two sites reads the other's update (the sum minus its own); pass "
            "--threshold 3 or more to protect single updates",
            err=True,
        )
    click.echo(f"  {folders['ca']}/  certificate authority (keep ca.key offline)")
    click.echo(f"  {folders['server']}/  server kit: public CKKS context, no secret key")
    for name in names:
        click.echo(f"  {folders[name]}/  kit of site {name}: holds the secret CKKS context")
    click.echo(f"  {folders['admin']}/  admin kit for 'secagg status' and 'secagg abort'")
    click.echo(
        "give each party its own folder (files are 0600); never give a site kit to the server"
    )


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
    from secagg.records import headline

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


if __name__ == "__main__":
    main()
