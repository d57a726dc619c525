"""What every command shares: one-line errors, defaults shown from the job's settings, and the
option groups several commands take (optimization, differential privacy, HE precision)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any

import click

from secagg.config import (
    HE_PRECISIONS,
    LR_SCHEDULES,
    SERVER_OPTIMIZERS,
    RunConfig,
)
from secagg.errors import ConfigError, SecAggError


def _default(name: str) -> str:
    """`` [default: x]`` for a RunConfig field, so --help shows the defaults a run really uses
    (the flags themselves default to None: 'not given', so a job file's value stands)."""
    value = getattr(RunConfig, name)
    shown = ("on" if value else "off") if isinstance(value, bool) else value
    return f" [default: {shown}]"


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


#: The admin kit, which ``status`` and ``abort`` speak to the server with.
_ADMIN_KIT = click.option(
    "--kit", "kit_dir", required=True, type=click.Path(file_okay=False), help="The admin kit."
)
_MASKING_HELP = (
    "With --he: pairwise masks inside the ciphertexts, so neither the server nor the server "
    "with fewer than all other clients of a round can read one client's update; sites sign "
    "their mask keys with their site certificate (deployments) and correct for sites lost "
    f"mid-round.{_default('masking')}"
)
_MASKING = click.option("--masking/--no-masking", default=None, help=_MASKING_HELP)
_ROUNDS = click.option(
    "--rounds", type=click.IntRange(min=1), help=f"Federated rounds.{_default('rounds')}"
)


def _tracking(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where ``run`` and ``server`` log: MLflow's store and experiment, or nowhere."""
    command = click.option("--experiment", help=f"MLflow experiment name.{_default('experiment')}")(
        command
    )
    command = click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")(command)
    return click.option(
        "--tracking-uri", help="MLflow tracking URI [default: sqlite:///mlflow.db]."
    )(command)


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
    click.option(
        "--lr-step-rounds", type=click.IntRange(min=1), help="step: rounds per step [10]."
    ),
    click.option(
        "--lr-gamma", type=click.FloatRange(0, 1, min_open=True), help="step: factor [0.1]."
    ),
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
        click.FloatRange(min=0, min_open=True),
        "Differential privacy within this epsilon over the job's rounds (the noise is "
        "calibrated to it, and the run stops before exceeding it); with --he inside the "
        "encrypted sum, without it central (the server adds the noise).",
    ),
    (
        "--dp-noise",
        click.FloatRange(min=0, min_open=True),
        "Differential privacy with this noise multiplier instead (with --dp-epsilon too: "
        "the run stops before exceeding that budget).",
    ),
    (
        "--dp-clip",
        click.FloatRange(min=0, min_open=True),
        f"with DP: the L2 bound each client clips its update to (with --dp-clip-quantile: "
        f"the first round's).{_default('dp_clip')}",
    ),
    (
        "--dp-clip-quantile",
        click.FloatRange(min=0, max=1, max_open=True),
        "with DP: adapt the clip each round towards this quantile of the clients' update "
        "norms, e.g. 0.5 (privately, inside the noised sum; 0: a fixed clip).",
    ),
    (
        "--dp-delta",
        click.FloatRange(min=0, max=1, min_open=True, max_open=True),
        f"with DP: the delta epsilon is stated at.{_default('dp_delta')}",
    ),
)


def _dp_settings_need_dp(config: RunConfig, flags: Mapping[str, Any]) -> None:
    """Refuse DP's settings given without DP (they would be silently unused)."""
    given = [
        "--" + name.replace("_", "-")
        for name in ("dp_clip", "dp_delta")
        if flags.get(name) is not None
    ]
    if given and not config.dp:
        raise ConfigError(
            f"{' and '.join(given)} set differential privacy, which this job does not add: "
            "give --dp-epsilon or --dp-noise too (or leave them out)"
        )


def _privacy(command: Callable[..., Any]) -> Callable[..., Any]:
    """The differential-privacy flags of ``run`` and ``server``."""
    for name, kind, text in reversed(_PRIVACY):
        command = click.option(name, type=kind, help=text)(command)
    return command


def _note(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """Library warnings (a partition that could not honour its settings...) as one line."""
    click.echo(f"note: {message}", err=True)
