"""The ``secagg`` command: click commands only, each parsing flags into one library call."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from secagg.config import (
    DATASETS,
    LR_SCHEDULES,
    MODELS,
    OPTIMIZERS,
    SERVER_OPTIMIZERS,
    TRANSPORTS,
    RunConfig,
    load_job,
    with_overrides,
)
from secagg.crypto.params import CkksParams
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
@click.option(
    "--task",
    help="Your task by import path, package.module:TaskClass (default: the built-in "
    "classification of --dataset and --model). Its settings go in the job file's "
    "[task_settings] table.",
)
@click.option(
    "--initial-model",
    type=click.Path(dir_okay=False),
    help="A state dict every party starts from (torch.save(model.state_dict(), path)).",
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
    "--transport",
    type=click.Choice(TRANSPORTS),
    help="inprocess (default): clients are objects in this process; grpc: a server process "
    "and one process per client on localhost, over mutual TLS.",
)
@click.option("--min-clients", type=click.IntRange(min=0), help="Sites a round needs [all].")
@click.option("--round-timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds.")
@click.option(
    "--resume", is_flag=True, help="Continue the interrupted run in --output (or the latest)."
)
@_optimization
@_friendly
def run(job: str | None, resume: bool, no_tracking: bool, **flags: Any) -> None:
    """Run a federated job: JOB is an optional TOML job file; flags override it."""
    from secagg.records import latest_run_dir

    config = load_job(job) if job else RunConfig()
    config = with_overrides(config, **flags, tracking=False if no_tracking else None).validate()
    resume_dir = None
    if resume:
        if config.transport == "grpc":
            raise click.UsageError("--resume is for in-process runs; a restarted server resumes")
        resume_dir = Path(flags["output_dir"]) if flags["output_dir"] else latest_run_dir()
        click.echo(f"resuming {resume_dir}")
    else:
        mode = "HE (CKKS)" if config.he else "plaintext FedAvg"
        where = "in one process" if config.transport == "inprocess" else "over gRPC on localhost"
        what = f"task {config.task}" if config.task else f"{config.dataset}/{config.model}"
        click.echo(
            f"secagg run: {what}, {config.clients} clients, {config.rounds} rounds, {mode}, {where}"
        )
    if config.transport == "grpc":
        from secagg.deploy import run_local

        result = run_local(config, log=click.echo)
    else:
        from secagg.job import run_job

        result = run_job(
            config, resume_dir=resume_dir, on_round=_progress(config.rounds, config.he)
        )
    _summary(result, model=True)


def _progress(total: int, he: bool) -> Callable[[Any], None]:
    """One line per round: the task's evaluation metrics, time, bytes, and for HE the time
    spent encrypting, adding and decrypting."""

    def show(m: Any) -> None:
        evaluated = {k: v for k, v in m.metrics.items() if not k.startswith("train_")}
        shown = "".join(f"  {_SHORT.get(k, k)} {v:.4f}" for k, v in evaluated.items())
        line = (
            f"round {m.round:>3}/{total}{shown}  loss {m.loss:.4f}  {m.round_seconds:6.2f}s  "
            f"up {_mb(m.bytes_up)} down {_mb(m.bytes_down)}"
        )
        if he:
            line += (
                f"  enc {m.encrypt_seconds:.2f}s agg {m.aggregate_seconds:.2f}s "
                f"dec {m.decrypt_seconds:.2f}s"
            )
        click.echo(line)

    return show


_SHORT = {"accuracy": "acc"}


def _summary(result: Any, model: bool) -> None:
    """The closing lines of a run: final accuracy, where the results went, MLflow."""
    parameters = f" ({result.num_parameters:,} parameters)" if result.num_parameters else ""
    click.echo(
        f"done: final accuracy {result.final_accuracy:.4f} after {len(result.rounds)} rounds "
        f"in {result.seconds:.1f}s{parameters}"
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


@main.command()
@click.option("--server", "server_address", help="The server's HOST[:PORT] as sites will reach it.")
@click.option("--clients", "sites", help="Site names, comma-separated: site-1,site-2,...")
@click.option(
    "--project-file",
    type=click.Path(dir_okay=False, exists=True),
    help="A TOML file with name, server and clients, instead of the two flags.",
)
@click.option("--project", "project_name", default="secagg", show_default=True)
@click.option(
    "--out", "out_dir", default="project", show_default=True, type=click.Path(file_okay=False)
)
@click.option("--force", is_flag=True, help="Replace existing kits.")
@_friendly
def provision(
    server_address: str | None,
    sites: str | None,
    project_file: str | None,
    project_name: str,
    out_dir: str,
    force: bool,
) -> None:
    """Make a CA, certificates, CKKS keys and one startup kit per party."""
    from secagg import provision as kits

    if project_file:
        import tomllib

        spec = tomllib.loads(Path(project_file).read_text())
        server_address = spec.get("server", server_address)
        names = list(spec.get("clients", []))
        project_name = spec.get("name", project_name)
    else:
        names = [name.strip() for name in (sites or "").split(",") if name.strip()]
    if not server_address or not names:
        raise click.UsageError(
            "give --server HOST[:PORT] and --clients a,b,... (or --project-file)"
        )
    click.echo(
        f"provisioning project '{project_name}': server {server_address}, {len(names)} sites"
    )
    folders = kits.provision(out_dir, server_address, names, project_name, force=force)
    click.echo(f"  {folders['ca']}/  certificate authority (keep ca.key offline)")
    click.echo(f"  {folders['server']}/  server kit: public CKKS context, no secret key")
    for name in names:
        click.echo(f"  {folders[name]}/  kit of site {name}: holds the secret CKKS context")
    click.echo(f"  {folders['admin']}/  admin kit for 'secagg status' and 'secagg abort'")
    click.echo(
        "give each party its own folder (files are 0600); never give a site kit to the server"
    )


@main.command()
@click.argument("job", required=False, type=click.Path(dir_okay=False))
@click.option("--kit", "kit_dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--task",
    help="The task by import path, package.module:TaskClass; every site must be able to import it.",
)
@click.option("--workdir", type=click.Path(file_okay=False), help="Checkpoints and results.")
@click.option("--bind", help="Address to listen on [all interfaces, the kit's port].")
@click.option("--rounds", type=click.IntRange(min=1))
@click.option("--he/--no-he", default=None)
@click.option("--min-clients", type=click.IntRange(min=0), help="Sites a round needs [all].")
@click.option("--round-timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds.")
@click.option(
    "--liveness",
    type=click.FloatRange(min=1),
    default=15.0,
    show_default=True,
    help="Seconds without a heartbeat before a site is taken for gone.",
)
@click.option("--tracking-uri", help="MLflow tracking URI [sqlite:///mlflow.db].")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--experiment", help="MLflow experiment name [secagg].")
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
        on_round=_progress(config.rounds, bool(config.he)),
        log=click.echo,
    )
    _summary(result, model=False)  # the server cannot decrypt: it holds no model


@main.command()
@click.option("--kit", "kit_dir", required=True, type=click.Path(file_okay=False))
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--download/--no-download", default=False, help="Download torchvision datasets.")
@click.option("--device", default="auto", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), help="Model and metrics [runs/].")
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
        raise SecAggError(f"the job was aborted: {outcome}")
    log("the job is done")


@main.command()
@click.option("--kit", "kit_dir", required=True, type=click.Path(file_okay=False))
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
        click.echo(f"  {site['name']:<16} {state:<14} round {site['applied']}")
    for row in info["history"]:
        click.echo(
            f"  round {row['round']:>3}: accuracy {row['accuracy']:.4f}, loss {row['loss']:.4f}, "
            f"{row['clients']} sites"
        )
    for line in info.get("refusals", []):
        click.echo(f"  refused: {line}")


@main.command()
@click.option("--kit", "kit_dir", required=True, type=click.Path(file_okay=False))
@click.option("--reason", default="aborted by the administrator", show_default=True)
@_friendly
def abort(kit_dir: str, reason: str) -> None:
    """Stop the job: the server tells every site and exits (admin kit)."""
    from secagg.deploy import admin_call

    admin_call(kit_dir, "Abort", {"reason": reason})
    click.echo(f"abort sent: {reason}")


if __name__ == "__main__":
    main()
