"""Deployment: a server and its sites on their own machines, over gRPC with mutual TLS.

- ``serve``: ``secagg server``. Runs the job's rounds with the same round code as an
  in-process run (``secagg.rounds``), over ``GrpcTransport``. It loads the public context from
  its kit and nothing else; it checkpoints every round's aggregates before any site applies
  them, and a restarted server resumes from its work folder where it was.
- ``participate``: ``secagg client``. One site: joins, trains when asked, keeps the decrypted
  global model and its metrics in its work folder.
- ``run_local``: ``secagg run --transport grpc``. A throwaway project on localhost: a server
  process and one client process per site, the deployment's code path on one machine.

Which data a site trains on: ``shard="auto"`` takes the job's Dirichlet shard for the site's
position in the roster, from the dataset in ``--data-dir`` (what a simulation partitions, so
the result equals an in-process run with the same seed); ``shard="all"`` takes every training
example in ``--data-dir`` (a real site with its own data).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secagg import crypto
from secagg.config import RunConfig, dump_job
from secagg.errors import CheckpointError, ConfigError, PayloadError, SecAggError
from secagg.messages import ModelSignature
from secagg.outputs import RESULTS_FILE, SITES_DIR, check_new_output, new_output_dir
from secagg.privacy import described, extra_sizes
from secagg.provision import Kit, load_kit, provision
from secagg.records import RunRecords, RunResult
from secagg.resume import refuse_changes
from secagg.rounds import RoundFailed, RoundMetrics
from secagg.server import STATE_FILE, Server, load_checkpoint

if TYPE_CHECKING:  # the server side of this module never imports torch
    from secagg.client import Client
    from secagg.crypto.certified import CertifiedIdentities
    from secagg.transport.grpc_client import Joined

#: Local settings a site keeps from its own command line, not from the server's job.
SITE_LOCAL = ("data_dir", "download", "device", "keys_dir", "output_dir", "tracking")
#: The largest payload a server accepts (bytes): a 100M-parameter model is about 1.1 GB.
MAX_PAYLOAD = 16 << 30


def serve(
    kit_dir: str | Path,
    config: RunConfig,
    workdir: str | Path | None = None,
    bind: str | None = None,
    liveness: float = 15.0,
    on_round: Callable[[RoundMetrics], None] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> RunResult:
    """Serve the job to the kit's sites until its last round; return the run's result."""
    from secagg.transport.coordinator import Aborted, Coordinator
    from secagg.transport.grpc_server import GrpcTransport, Service, start

    kit = load_kit(kit_dir, "server")
    workdir = Path(workdir or Path("runs") / f"{config.job_name}-server")
    config = replace(
        config,
        keys_dir=str(kit.folder),
        clients=len(kit.roster),
        output_dir=str(workdir),
        transport="grpc",
    ).validate()
    try:  # the sites would refuse it: say so before serving
        kit.policy().check_job(config, "every site would refuse it, so the server does not start")
    except PayloadError as err:
        raise ConfigError(str(err)) from err
    resume = (workdir / STATE_FILE).exists()
    changes: dict[str, object] = {}
    if resume:
        checkpoint = load_checkpoint(workdir)
        saved = checkpoint.state["config"]
        if saved.get("job_name") != config.job_name:
            raise CheckpointError(
                f"{workdir}/ holds job '{saved.get('job_name')}', not '{config.job_name}'; "
                "pass another --workdir"
            )
        changes = _restart_changes(workdir, RunConfig(**saved), config)
        if checkpoint.round_num >= config.rounds:
            raise ConfigError(
                f"the job in {workdir}/ is finished: all {checkpoint.round_num} rounds ran; "
                f"to train on, restart with --rounds above {checkpoint.round_num}, or pass "
                "another --workdir for a new run"
            )
        log(f"resuming from {workdir}/")
    records = RunRecords.open(config, workdir if resume else None, changes=changes)
    config = records.config
    cipher = crypto.for_server(config.he, config.keys_dir, config.precision, config.privacy())
    server = Server(cipher, workdir, masking=config.he and config.masking)
    shared = {k: v for k, v in config.to_dict().items() if k not in SITE_LOCAL}
    coordinator = Coordinator(
        kit,
        cipher,
        shared,
        records.job_id,
        workdir,
        records.first_round - 1,
        liveness,
        config.max_client_samples,
        log,
        lambda values: extra_sizes(values, config),
    )
    # The job's model, built from the job in a child process (this one loads no torch and
    # runs no task code) while the service starts: every site is checked against it.
    building = _build_model(config)
    records.claim(server)  # before any site learns the job's id
    service = Service(coordinator, MAX_PAYLOAD, stall=liveness, deadline=config.round_timeout)
    grpc_server, port = start(service, kit, bind or f"[::]:{kit.port}")
    try:
        model = _built_model(building)
    except ConfigError:
        grpc_server.stop(grace=0)
        raise
    coordinator.expect(ModelSignature.from_wire(model["model"]), int(model["parameters"]))
    records.result.model_class = str(model["class"])
    log(
        f"serving job '{config.job_name}' to {len(kit.roster)} sites on port {port} "
        f"({_privacy(config)}, rounds {records.first_round}-{config.rounds}; model "
        f"{model['class']}, {model['parameters']:,} parameters)"
    )
    records.start(int(model["parameters"]))
    records.claim(server)  # and its MLflow run
    minimum = config.min_clients or len(kit.roster)
    if config.he and config.masking:
        # The sites refuse any sum below the kits' threshold: waiting for fewer is pointless.
        threshold = kit.policy().threshold
        if minimum < threshold:
            log(f"min_clients {minimum} is below the kits' round policy; using {threshold}")
            minimum = threshold
    transport = GrpcTransport(coordinator, minimum, config.round_timeout)

    def after_round(metrics: RoundMetrics) -> None:
        value = metrics.value(config.headline)
        coordinator.history.append(
            {
                "round": metrics.round,
                "clients": metrics.clients,
                "metric": config.headline,
                "value": value if math.isfinite(value) else None,
            }
        )
        if on_round is not None:
            on_round(metrics)

    def retry(round_num: int, err: RoundFailed) -> None:
        log(f"{err}; trying round {round_num} again")

    try:
        records.run_rounds(server, transport, after_round, retry)
        coordinator.post("done", config.rounds, frozenset(range(len(kit.roster))))
        coordinator.wait_told(timeout=min(liveness, 10.0))
        records.result.num_parameters = coordinator.parameters
        return records.finish()
    except Aborted:
        coordinator.wait_told(timeout=min(liveness, 10.0))
        raise
    except Exception as err:
        # The job failed here: every connected site hears why and ends, rather than
        # reconnecting to a server that is gone.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        coordinator.abort(f"the job failed: {reason}")
        coordinator.wait_told(timeout=min(liveness, 10.0))
        raise
    finally:
        grpc_server.stop(grace=2)


def _build_model(config: RunConfig) -> subprocess.Popen[str]:
    """Start ``secagg.fingerprint`` on the job (see ``_built_model``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "secagg.fingerprint", json.dumps(config.to_dict())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _built_model(process: subprocess.Popen[str]) -> dict[str, Any]:
    """The job's model as ``secagg.fingerprint`` built it, or ConfigError saying why not."""
    try:
        out, err = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    if process.returncode != 0:
        why = (err.strip().splitlines() or ["it stopped without saying why"])[-1]
        raise ConfigError(
            f"the server could not build the job's model to check sites against: {why} "
            "(the task's package and torch must be importable where the server runs)"
        )
    return dict(json.loads(out))


def participate(
    kit_dir: str | Path,
    data_dir: str = "data",
    download: bool = False,
    device: str = "auto",
    workdir: str | Path | None = None,
    shard: str = "auto",
    wait: float = 600.0,
    log: Callable[[str], None] = lambda line: None,
) -> str:
    """Take part in the kit's job until it ends; return ``done`` or why it was aborted."""
    from secagg.transport.grpc_client import Connection, ServerGone, Site, join, tell_failed
    from secagg.transport.grpc_wire import Hello

    if shard not in ("auto", "all"):
        raise ConfigError(f"--shard must be auto or all, not {shard!r}")
    kit = load_kit(kit_dir, "client")
    connection = Connection(kit)
    try:
        joined = join(connection, Hello(), wait, log)
        try:
            config, client, identities = _prepare(
                kit, joined, data_dir, download, device, shard == "auto"
            )
        except SecAggError as err:
            # Say why to the server, so it need not wait for this site.
            tell_failed(connection, str(err))
            raise
        folder = (
            Path(workdir) if workdir else Path("runs") / f"{_plain(config.job_name)}-{kit.name}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        site = Site(connection, client, joined, folder, log, identities, kit.certificate)
        log(f"joined job '{config.job_name}' as {kit.name} (task {type(client.task).__name__})")
        parameters = sum(p.numel() for p in client.model.parameters())
        delay = 1.0
        #: since when no call reached the server (None: the last one did); ``wait`` bounds it
        lost_since: float | None = None
        while True:
            applied = site.applied
            try:
                left = wait if lost_since is None else wait - (time.monotonic() - lost_since)
                # Which job first: this site's mask key is signed for its own job only.
                again = join(connection, Hello(), max(left, 1.0), log)
                if again.job != joined.job:
                    raise CheckpointError(
                        "the server now runs another job; start this client again to join it"
                    )
                hello = Hello(site.applied, parameters, client.signature, site.mask_key())
                again = join(connection, hello, max(left, 1.0), log)
                lost_since = None
                site.joined = again
                return site.run()
            except ServerGone as err:
                # Any transient status (a call cut, the server restarting or busy): join again,
                # backing off while no round gets applied in between.
                lost_since = lost_since if lost_since is not None else time.monotonic()
                if time.monotonic() - lost_since >= wait:
                    raise ServerGone(
                        f"lost the server for {wait:.0f} s ({err}); this site stops (start it "
                        "again, or raise --wait, to rejoin a server that comes back later)"
                    ) from err
                delay = 1.0 if site.applied > applied else min(delay * 2, 30.0)
                log(f"lost the server ({err}); reconnecting in {delay:.0f} s")
                time.sleep(delay)
    finally:
        connection.close()


def _prepare(
    kit: Kit, joined: Joined, data_dir: str, download: bool, device: str, partition: bool
) -> tuple[RunConfig, Client, CertifiedIdentities | None]:
    """The job as this site runs it, its client (the job's task with this site's data), and
    when the job masks, the site identities that sign and check the mask keys."""
    from secagg import keys
    from secagg.builtin import task_for
    from secagg.client import Client, resolve_device, use_threads
    from secagg.crypto.certified import CertifiedIdentities
    from secagg.task import Site as SiteInfo
    from secagg.transport.grpc_client import check_keys

    local = {"data_dir": data_dir, "download": download, "device": device}
    config = RunConfig(**{**joined.config, **local, "keys_dir": str(kit.folder)})
    config = replace(config, tracking=False).validate()
    # The job comes from the server: it must protect this site's update as the kits require.
    policy = kit.policy()
    policy.check_job(config)
    use_threads(config)
    if config.he:
        check_keys(joined, keys.load_for_client(kit.folder).fingerprint)
    info = SiteInfo(
        joined.index,
        kit.name,
        joined.roster,
        Path(data_dir),
        partition=partition,
        seed=config.seed,
        download=download,
        settings=config.task_settings,
    )
    identities = None
    if config.he and config.masking:
        identities = CertifiedIdentities(kit.roster, joined.index, kit.private_key, kit.ca)
    make_cipher = crypto.for_client(
        config.he,
        kit.folder,
        config.precision,
        identities,
        policy,
        config.privacy(policy.threshold),
    )
    client = Client(task_for(config), info, config, make_cipher, resolve_device(device))
    return config, client, identities


def _privacy(config: RunConfig) -> str:
    """How the job protects updates, in words."""
    words = {"masked": "HE, pairwise masks", "he": "HE, no masks", "plain": "plaintext"}
    dp = described(config)
    return words[config.protection] + (f", {dp}" if dp else "")


def _plain(name: str) -> str:
    """A job name from the server as a plain folder name: never a path, never hidden."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    return cleaned[:64] or "job"


def run_local(config: RunConfig, log: Callable[[str], None] = lambda line: None) -> RunResult:
    """``secagg run --transport grpc``: provision a throwaway project on localhost, start a
    server process and one client process per site, and return the server's result."""
    output = new_output_dir(config.tracking_settings)
    check_new_output(output)
    output.mkdir(parents=True, exist_ok=True)
    sites = [f"site-{i + 1}" for i in range(config.clients)]
    secagg = [sys.executable, "-m", "secagg.cli"]
    with tempfile.TemporaryDirectory(prefix="secagg-project-") as project:
        port = _free_port()
        dp = config.he and config.dp  # what the kits require: what this job gives
        provision(
            project,
            f"localhost:{port}",
            sites,
            project="secagg-local",
            protection=config.protection,
            dp_noise=config.noise_multiplier() if dp else 0.0,
            dp_clip=config.dp_clip if dp else 0.0,
        )
        # Beside the kits, not in the output: the server opens that folder as a new run.
        job_file = Path(project) / "job.toml"
        job_file.write_text(dump_job(replace(config, output_dir=None, transport="grpc")))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        server = subprocess.Popen(
            [
                *secagg,
                "server",
                str(job_file),
                "--kit",
                f"{project}/server",
                "--workdir",
                str(output),
                "--bind",
                f"127.0.0.1:{port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        threads = max(1, (os.cpu_count() or 1) // len(sites))
        site_env = {**env, "OMP_NUM_THREADS": str(threads)}
        # Each site's own output goes to a log file of its own (a pipe nobody reads would
        # block a talkative site); the server reports a failed site's reason by name.
        (output / SITES_DIR).mkdir(exist_ok=True)
        logs = [(output / SITES_DIR / f"{site}.log").open("w") for site in sites]
        clients = [
            subprocess.Popen(
                [
                    *secagg,
                    "client",
                    "--kit",
                    f"{project}/{site}",
                    "--data-dir",
                    config.data_dir,
                    "--device",
                    config.device,
                    "--workdir",
                    str(output / SITES_DIR / site),
                    "--shard",
                    "auto",
                ],
                stdout=site_log,
                stderr=subprocess.STDOUT,
                text=True,
                env=site_env,
            )
            for site, site_log in zip(sites, logs, strict=True)
        ]
        lines: list[str] = []
        try:
            _relay(server, lines, log)
            code = server.wait()
        finally:
            for proc in [server, *clients]:
                if proc.poll() is None:
                    proc.terminate()
            for proc in clients:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for site_log in logs:
                site_log.close()
        if code != 0:
            detail = lines[-1] if lines else f"exit code {code}"
            raise SecAggError(f"the server process failed: {detail}")
        (output / "job.toml").write_text(job_file.read_text())
    model = output / SITES_DIR / sites[0] / "model.pt"
    if model.exists():
        (output / "model.pt").write_bytes(model.read_bytes())
    return RunResult.from_dict(json.loads((output / RESULTS_FILE).read_text()), output)


def _relay(proc: subprocess.Popen[str], lines: list[str], log: Callable[[str], None]) -> None:
    """Pass the server's progress on, line by line, until it exits (its closing summary is
    left to the caller, which reports the run as a whole)."""
    assert proc.stdout is not None
    summary = False
    for line in proc.stdout:
        lines.append(line.rstrip())
        summary = summary or line.startswith("done: ")
        if not summary:
            log(line.rstrip())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def admin_call(kit_dir: str | Path, method: str, message: dict[str, Any]) -> dict[str, Any]:
    """One admin RPC (``Status``, ``Abort``) with the admin kit's certificate."""
    from secagg.transport.grpc_client import Connection, ServerGone

    kit = load_kit(kit_dir, "admin")
    connection = Connection(kit)
    try:
        return connection.call(method, message, timeout=20)
    except ServerGone as err:
        raise ServerGone(
            f"no server answers at {kit.server}; is 'secagg server' running there? ({err})"
        ) from err
    finally:
        connection.close()


#: Settings a restarted server takes from where and how it runs (its kit, MLflow, its patience
#: with the sites), not from the job it resumes.
_RESTART_LOCAL = (
    *SITE_LOCAL,
    "clients",
    "transport",
    "tracking_uri",
    "experiment",
    "ray_address",
    "client_cpus",
    "client_gpus",
    "torch_threads",
    "round_timeout",
    "round_retries",
)


def _restart_changes(workdir: Path, saved: RunConfig, config: RunConfig) -> dict[str, object]:
    """The job settings a restarted server was given that differ from the run in
    ``workdir``: those ``resume.RESUMABLE`` allows (``rounds``), or a ConfigError naming the
    others (a restart never silently drops a flag: DP, the optimizer)."""
    changed = {
        f.name: (getattr(saved, f.name), getattr(config, f.name))
        for f in fields(RunConfig)
        if f.name not in _RESTART_LOCAL and getattr(saved, f.name) != getattr(config, f.name)
    }
    refuse_changes(
        changed,
        f"{workdir}/ holds this job as it started, to be restarted with its own settings",
        "restart with them, or pass another --workdir",
    )
    return {name: new for name, (_, new) in changed.items()}
