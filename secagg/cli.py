"""The ``secagg`` command: click commands only, each parsing flags into one library call."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from secagg.config import (
    DATASETS,
    MODELS,
    OPTIMIZERS,
    CkksParams,
    RunConfig,
    load_job,
    with_overrides,
)
from secagg.errors import SecAggError


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


@click.group()
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="secagg")
def main(debug: bool) -> None:
    """Federated learning with homomorphic-encryption secure aggregation."""


@main.command()
@click.option(
    "--out", "out_dir", default="keys", show_default=True, type=click.Path(file_okay=False)
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
    help="Bit sizes of the coefficient-modulus primes, data primes first, special prime last.",
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
    click.echo(f"generating CKKS keys (N={poly_degree}, primes {list(bits)})...")
    manifest = keys.generate(out_dir, params, force=force)
    out = Path(out_dir)
    click.echo(f"  {out / keys.CLIENT_FILE}  secret context: clients only (mode 600)")
    click.echo(f"  {out / keys.SERVER_FILE}  public context: the server (no secret key)")
    click.echo(f"  {out / keys.MANIFEST_FILE}  fingerprint {manifest['fingerprint']}")


@main.command()
@click.argument("job", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--he/--no-he", default=None, help="Homomorphic-encryption aggregation (default off)."
)
@click.option("--clients", type=click.IntRange(1, 1024))
@click.option("--rounds", type=click.IntRange(min=1))
@click.option("--local-epochs", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), help="Local optimizer [sgd].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True))
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), help="Dirichlet label skew.")
@click.option("--seed", type=int)
@click.option("--dataset", type=click.Choice(DATASETS))
@click.option("--model", type=click.Choice(MODELS))
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--download/--no-download", default=None, help="Download torchvision datasets.")
@click.option("--device", help="auto (CUDA when available), cpu, cuda, cuda:N.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False), help="Keys folder [keys].")
@click.option("--output", "output_dir", type=click.Path(file_okay=False), help="Run folder.")
@click.option("--tracking-uri", help="MLflow tracking URI [sqlite:///mlflow.db].")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--experiment", help="MLflow experiment name [secagg].")
@click.option(
    "--resume", is_flag=True, help="Continue the interrupted run in --output (or the latest)."
)
@_friendly
def run(job: str | None, resume: bool, no_tracking: bool, **flags: Any) -> None:
    """Run a federated job: JOB is an optional TOML job file; flags override it."""
    from secagg.job import latest_run_dir, run_job

    config = load_job(job) if job else RunConfig()
    config = with_overrides(config, **flags, tracking=False if no_tracking else None).validate()
    resume_dir = None
    if resume:
        resume_dir = Path(flags["output_dir"]) if flags["output_dir"] else latest_run_dir()
        click.echo(f"resuming {resume_dir}")
    else:
        mode = "HE (CKKS)" if config.he else "plaintext FedAvg"
        click.echo(
            f"secagg run: {config.dataset}/{config.model}, {config.clients} clients, "
            f"{config.rounds} rounds, {mode}"
        )
    total = config.rounds

    def progress(m: Any) -> None:
        click.echo(
            f"round {m.round:>3}/{total}  acc {m.accuracy:.4f}  loss {m.loss:.4f}  "
            f"{m.round_seconds:6.2f}s  up {_mb(m.bytes_up)} down {_mb(m.bytes_down)}  "
            f"enc {m.encrypt_seconds:.2f}s agg {m.aggregate_seconds:.2f}s "
            f"dec {m.decrypt_seconds:.2f}s"
        )

    result = run_job(config, resume_dir=resume_dir, on_round=progress)
    click.echo(
        f"done: final accuracy {result.final_accuracy:.4f} after {len(result.rounds)} rounds "
        f"in {result.seconds:.1f}s ({result.num_parameters:,} parameters)"
    )
    click.echo(f"  results: {result.output_dir / 'results.json'}")
    click.echo(f"  model:   {result.output_dir / 'model.pt'}")
    if result.mlflow_run_id:
        click.echo(
            f"  MLflow run {result.mlflow_run_id} in {result.tracking_uri}\n"
            f"  view: mlflow ui --backend-store-uri {result.tracking_uri}"
        )


def _mb(n: float) -> str:
    return f"{n / 1e6:7.2f} MB"


if __name__ == "__main__":
    main()
