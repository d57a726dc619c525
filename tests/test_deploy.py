"""Deployment for real: a server process and site processes over gRPC with mutual TLS, on
loopback. Every test starts real processes with the ``secagg`` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
import torch
from test_secrets import secret_key_windows

from secagg.config import RunConfig, dump_job
from secagg.crypto import Stamp
from secagg.errors import KeyFileError, PayloadError
from secagg.messages import FitReply, TrainReply
from secagg.provision import load_kit, provision
from secagg.transport import grpc_wire as wire
from secagg.transport.inprocess import InProcessTransport

if TYPE_CHECKING:
    from secagg.transport.grpc_client import Site

ROOT = Path(__file__).resolve().parents[1]
SECAGG = [sys.executable, "-m", "secagg.cli"]
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _project(
    tmp: Path, sites: int, threshold: int = 2, protection: str = "masked"
) -> tuple[Path, int]:
    """A project of ``sites`` sites whose round policy lets a sum of ``threshold`` be
    decrypted (2: these tests drop sites out of small rounds; the default is larger) and
    requires ``protection`` of every job."""
    port = _free_port()
    names = [f"site-{i + 1}" for i in range(sites)]
    provision(
        tmp / "project", f"localhost:{port}", names, threshold=threshold, protection=protection
    )
    return tmp / "project", port


def _job(tmp: Path, **changes: object) -> tuple[Path, RunConfig]:
    config = RunConfig(he=True, clients=3, rounds=2, local_epochs=1, tracking=False)
    for key, value in changes.items():
        config = config.__class__(**{**config.to_dict(), key: value})
    path = tmp / "job.toml"
    path.write_text(dump_job(config))
    return path, config


def _secagg(fault: str | None) -> list[str]:
    """The ``secagg`` command, or with ``fault`` the one ``tests/patched.py`` patches."""
    return SECAGG if fault is None else [sys.executable, str(ROOT / "tests" / "patched.py"), fault]


def _server(
    project: Path, job: Path, workdir: Path, port: int, *extra: str, fault: str | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *_secagg(fault),
            "server",
            str(job),
            "--kit",
            str(project / "server"),
            "--workdir",
            str(workdir),
            "--bind",
            f"127.0.0.1:{port}",
            "--liveness",
            "5",
            "--no-tracking",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )


def _site(
    project: Path,
    name: str,
    workdir: Path,
    fault: str | None = None,
    wait: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *_secagg(fault),
            "client",
            "--kit",
            str(project / name),
            "--workdir",
            str(workdir / name),
            "--wait",
            str(wait),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or ENV,
    )


def _job_done(server: subprocess.Popen, sites: list[subprocess.Popen]) -> str:
    """The server's output once it ended the job (exit 0) and every site said it is done."""
    out = _finish(server)
    assert server.returncode == 0, out[-3000:]
    for site in sites:
        assert "the job is done" in _finish(site, 60)
    return out


def _lying_server(
    tmp: Path, fault: str, retries: int, round_timeout: float = 30.0
) -> tuple[str, Path, list[str]]:
    """One round of a 3-site job against a server patched with ``fault`` (``tests/patched.py``),
    which must fail: its output, the project, the sites' logs."""
    project, port = _project(tmp, 3)
    job, _ = _job(tmp, rounds=1, round_retries=retries, round_timeout=round_timeout)
    work = tmp / "work"
    server = _server(project, job, work / "server", port, fault=fault)
    sites = [_site(project, f"site-{i}", work) for i in (1, 2, 3)]
    try:
        out = _finish(server, 240)
        assert server.returncode != 0, out[-3000:]
    finally:
        _kill_all(server)
        for site in sites:
            if site.poll() is None:
                site.kill()
        logs = [site.communicate()[0] for site in sites]
    return out, project, logs


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"process did not finish:\n{out[-3000:]}") from None
    return out


def _stopped_with(proc: subprocess.Popen, first: str, timeout: float = 120) -> str:
    """The output of a process that stopped with exit 1, its last line starting ``first``."""
    out = _finish(proc, timeout)
    assert proc.returncode == 1, out[-3000:]
    assert out.strip().splitlines()[-1].startswith(first), out[-3000:]
    return out


def _wait_for(condition: Callable[[], bool], timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _applied(workdir: Path, name: str) -> int:
    try:
        rounds = json.loads((workdir / name / "metrics.json").read_text())["rounds"]
    except (FileNotFoundError, ValueError):
        return 0
    return max((r["applied"] for r in rounds), default=0)


def _kill_all(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_provision_writes_private_kits_and_never_overwrites(tmp_path: Path) -> None:
    folders = provision(tmp_path, "fl.example.org:9000", ["site-a", "site-b"])
    assert set(folders) == {"ca", "server", "site-a", "site-b", "admin"}
    for folder in folders.values():
        assert folder.stat().st_mode & 0o777 == 0o700
        for path in folder.iterdir():
            assert path.stat().st_mode & 0o777 == 0o600, path
    server = load_kit(folders["server"], "server")
    assert server.server == "fl.example.org:9000" and server.roster == ("site-a", "site-b")
    assert not (folders["server"] / "client.ctx").exists()  # the server never gets the key
    assert (folders["site-b"] / "client.ctx").exists()
    assert load_kit(folders["site-b"], "client").index == 1
    with pytest.raises(KeyFileError, match="--force"):
        provision(tmp_path, "fl.example.org:9000", ["site-a"])
    with pytest.raises(KeyFileError, match="is the client kit of 'site-a'; pass the server kit"):
        load_kit(folders["site-a"], "server")
    provision(tmp_path, "fl.example.org:9000", ["site-a"], force=True)
    assert not (tmp_path / "site-b").exists()


@pytest.mark.slow
def test_grpc_run_matches_the_in_process_run(tmp_path: Path, session_keys: Path) -> None:
    """`secagg run --transport grpc`: a server and three site processes, the same round code,
    pairwise masks on (the default); the global model equals the in-process run's without
    masks with the same seed, bit for bit (sums are exact integers, so neither the masks nor
    the keys, throwaway ones for the network run, matter)."""
    common = ["--he", "--clients", "3", "--rounds", "2", "--local-epochs", "1", "--no-tracking"]
    out = tmp_path / "grpc"
    done = subprocess.run(
        [*SECAGG, "run", *common, "--transport", "grpc", "--output", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "final accuracy" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [3, 3]
    assert results["config"]["transport"] == "grpc" and results["config"]["masking"]
    assert "HE, pairwise masks" in done.stdout

    local = tmp_path / "local"
    plain = subprocess.run(
        [
            *SECAGG,
            "run",
            *common,
            "--no-masking",
            "--keys",
            str(session_keys),
            "--output",
            str(local),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    grpc_model = torch.load(out / "model.pt")
    local_model = torch.load(local / "model.pt")
    for key, value in local_model.items():
        assert torch.equal(grpc_model[key], value), key
    local_results = json.loads((local / "results.json").read_text())
    assert [r["metrics"] for r in results["rounds"]] == [
        r["metrics"] for r in local_results["rounds"]
    ]


@pytest.mark.slow
def test_adaptive_clipping_over_grpc_moves_the_clip_alike_on_every_site(tmp_path: Path) -> None:
    """Distributed DP with adaptive clipping between real processes: every update carries
    the clip signal (the server sizes payloads for it without reading it), and the sites
    step the clip alike from the noised count (its average over the sites is one value)."""
    out = tmp_path / "grpc"
    done = subprocess.run(
        [
            *SECAGG,
            "run",
            *("--he", "--clients", "3", "--rounds", "2", "--local-epochs", "1"),
            *("--dp-noise", "0.05", "--dp-clip", "5", "--dp-clip-quantile", "0.5"),
            *("--transport", "grpc", "--no-tracking", "--output", str(out)),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    clips = [
        r["metrics"]["train_dp_clip"]
        for r in json.loads((out / "results.json").read_text())["rounds"]
    ]
    assert clips[0] == pytest.approx(5.0, rel=1e-6)
    # every site was under a clip of 5 (the count's noise, 3/20 of a site, lowers it at most)
    assert np.exp(-0.1) * (1 - 1e-6) <= clips[1] / clips[0] <= np.exp(-0.04)


@pytest.mark.slow
def test_server_holds_no_secret_and_loads_no_crypto_library(tmp_path: Path) -> None:
    project, port = _project(tmp_path, 2)
    job, _ = _job(tmp_path, clients=2, rounds=2)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port)
    sites = [_site(project, name, work) for name in ("site-1", "site-2")]
    try:
        _wait_for(lambda: _applied(work, "site-1") >= 1, what="round 1")
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert "tenseal" not in maps and "torch" not in maps  # it could not decrypt anything
        out = _finish(server)
        assert server.returncode == 0, out[-3000:]
    finally:
        _kill_all(server, *sites)
    windows = secret_key_windows((project / "site-1" / "client.ctx").read_bytes())
    for path in [*(project / "server").iterdir(), *(work / "server").rglob("*")]:
        if path.is_file():
            assert not any(w in path.read_bytes() for w in windows), path


@pytest.mark.slow
def test_a_site_killed_mid_round_is_left_out_and_the_average_stays_right(tmp_path: Path) -> None:
    project, port = _project(tmp_path, 3)
    # Thirty local epochs: a round lasts a second or two, so the kill lands inside round 2.
    job, _ = _job(tmp_path, rounds=3, min_clients=2, local_epochs=30, round_timeout=60.0)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port)
    sites = {name: _site(project, name, work) for name in ("site-1", "site-2", "site-3")}
    try:
        _wait_for(lambda: _applied(work, "site-3") >= 1, what="round 1 on site-3")
        sites["site-3"].send_signal(signal.SIGKILL)  # mid round 2: training or sealing
        out = _finish(server)
        assert server.returncode == 0, out[-3000:]
    finally:
        _kill_all(server, *sites.values())
    results = json.loads((work / "server" / "results.json").read_text())
    assert results["rounds"][0]["clients"] == 3
    assert results["rounds"][-1]["clients"] == 2
    # The sites checked the ledger: the sum holds sites 1 and 2 only, divided by their weight.
    rounds = json.loads((work / "site-1" / "metrics.json").read_text())["rounds"]
    last = rounds[-1]
    assert last["contributors"] == [0, 1]
    assert 0 < last["weight"] <= 1


@pytest.mark.slow
def test_a_round_below_min_clients_fails_with_a_reason_and_keeps_the_checkpoint(
    tmp_path: Path,
) -> None:
    project, port = _project(tmp_path, 3)
    job, _ = _job(
        tmp_path, rounds=3, min_clients=3, round_retries=1, local_epochs=30, round_timeout=12.0
    )
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port)
    sites = {name: _site(project, name, work) for name in ("site-1", "site-2", "site-3")}
    try:
        _wait_for(lambda: _applied(work, "site-3") >= 1, what="round 1 on site-3")
        sites["site-3"].send_signal(signal.SIGKILL)
        out = _finish(server)
        failed = time.monotonic()
        # The job failed: the healthy sites hear why and end, within seconds, exit 1.
        for name in ("site-1", "site-2"):
            _stopped_with(
                sites[name],
                "Error: the job ended unfinished: the job failed: round 2: only 2 site(s)",
                30,
            )
        assert time.monotonic() - failed < 10
    finally:
        _kill_all(server, *sites.values())
    assert server.returncode == 1
    assert "at least 3 are needed; trying round 2 again" in out
    assert out.strip().splitlines()[-1].startswith("Error: round 2: only 2 site(s)")
    state = json.loads((work / "server" / "state.json").read_text())
    assert state["round"] == 1  # round 1 stands, whole
    from secagg.server import load_checkpoint

    update, scales = load_checkpoint(work / "server").aggregates(1)
    assert update[:4] == b"SAGG" and scales is not None


@pytest.mark.slow
@pytest.mark.parametrize("crash", [1, 2])
def test_a_restarted_server_resumes_and_ends_where_an_uninterrupted_run_does(
    tmp_path: Path, crash: int
) -> None:
    """The server dies in round ``crash`` after every site sent, confirmed and revealed its
    update (the worst moment: a site never sends its update under another attempt; in round
    1, before any checkpoint: the job must still be the same job). Restarted, it resumes that
    attempt, the sites send the same bytes again, and the job ends as it would have.
    ``bench/restarts.py`` kills it at random moments."""
    project, port = _project(tmp_path, 3)
    job, _ = _job(tmp_path, rounds=4 if crash == 1 else 5, local_epochs=5)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port, fault=f"crash-unmasked:{crash}")
    sites = [_site(project, name, work) for name in ("site-1", "site-2", "site-3")]
    try:
        _finish(server)
        assert server.returncode == 9
        state = json.loads((work / "server" / "state.json").read_text())
        assert state["round"] == crash - 1  # the round was never checkpointed
        server = _server(project, job, work / "server", port)
        out = _finish(server)
        assert server.returncode == 0, out[-3000:]
        assert "resuming from" in out
        assert f"round {crash}: resuming the attempt it was running" in out
        for site in sites:
            assert "the job is done" in _finish(site, 60)
        # Restarted again: a changed flag is refused, never dropped, and a finished job says so.
        refused = _server(project, job, work / "server", port, "--dp-epsilon", "3")
        out = _finish(refused, 60)
        assert refused.returncode == 1, out[-3000:]
        assert "--dp-epsilon 3.0 (the run has 0.0) would make it another job" in out
        again = _server(project, job, work / "server", port)
        out = _finish(again, 60)
        assert again.returncode == 1 and "is finished: all" in out, out[-3000:]
    finally:
        _kill_all(server, *sites)
    # The same job uninterrupted, in one process, with the same keys.
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, kit in (
        ("client.ctx", "site-1"),
        ("server.ctx", "server"),
        ("manifest.json", "server"),
    ):
        (keys / name).write_bytes((project / kit / name).read_bytes())
        (keys / name).chmod(0o600)
    straight = subprocess.run(
        [*SECAGG, "run", str(job), "--keys", str(keys), "--output", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = json.loads((tmp_path / "s" / "results.json").read_text())["metric"]
    assert json.loads((work / "server" / "results.json").read_text())["metric"] == expected
    resumed = torch.load(work / "site-2" / "model.pt")
    for key, value in torch.load(tmp_path / "s" / "model.pt").items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.slow
def test_a_site_that_joins_late_catches_up_and_takes_part(tmp_path: Path) -> None:
    """site-3 starts after two rounds: it applies them from the server's chain, then trains
    in the rounds that follow, and ends with the model the others hold."""
    project, port = _project(tmp_path, 3)
    job, _ = _job(tmp_path, rounds=5, min_clients=2, local_epochs=20)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port)
    early = [_site(project, name, work) for name in ("site-1", "site-2")]
    late = None
    try:
        _wait_for(lambda: _applied(work, "site-1") >= 2, what="two rounds")
        late = _site(project, "site-3", work)
        out = _finish(server)
        assert server.returncode == 0, out[-3000:]
        assert "catching up" in _finish(late, 60)
    finally:
        _kill_all(server, *early, *([late] if late else []))
    rounds = json.loads((work / "site-3" / "metrics.json").read_text())["rounds"]
    assert [r["applied"] for r in rounds] == [1, 2, 3, 4, 5]
    assert 2 in rounds[-1]["contributors"]  # it took part again
    site_1, site_3 = (
        torch.load(work / "site-1" / "model.pt"),
        torch.load(work / "site-3" / "model.pt"),
    )
    for key, value in site_1.items():
        assert torch.equal(site_3[key], value), key


def _channel(kit_dir: Path, port: int, with_certificate: bool = True) -> grpc.Channel:
    kit = load_kit(kit_dir, "client")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=kit.ca,
        private_key=kit.private_key if with_certificate else None,
        certificate_chain=kit.certificate if with_certificate else None,
    )
    return grpc.secure_channel(f"localhost:{port}", credentials)


def _join(channel: grpc.Channel) -> dict:
    rpc = channel.unary_unary(wire.path("Join"))
    return wire.decode(rpc(wire.encode({"samples": 0}), timeout=10))


@pytest.mark.slow
def test_strangers_and_replays_are_refused_and_the_others_served(tmp_path: Path) -> None:
    project, port = _project(tmp_path, 2)
    job, _ = _job(tmp_path, clients=2, rounds=2)
    work = tmp_path / "work"
    other, _ = _project(tmp_path / "other", 2)
    server = _server(project, job, work / "server", port)
    site = _site(project, "site-1", work)
    try:
        # No client certificate, or one from another project's CA: refused in the handshake.
        _wait_for(lambda: _reachable(project / "site-2", port), what="the server")
        for channel in (
            _channel(project / "site-2", port, with_certificate=False),
            _channel(other / "site-2", port),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                _join(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # site-2 for real: it joins, and then replays its own contribution.
        manual = ManualSite(project / "site-2", port, work / "site-2")
        manual.play_round_with_replays()
        out = _finish(server)
        assert server.returncode == 0, out[-3000:]
        assert "the job is done" in _finish(site, 60)
    finally:
        _kill_all(server, site)
    results = json.loads((work / "server" / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [2, 2]


def _reachable(kit_dir: Path, port: int) -> bool:
    try:
        _join(_channel(kit_dir, port))
        return True
    except grpc.RpcError:
        return False


def joined_site(kit_dir: Path, port: int, workdir: Path) -> Site:
    """The kit's site as ``secagg client`` makes it (its client, and its certificate identity
    when the job masks), joined and ready with its model and mask key, driven by hand."""
    from secagg.deploy import _prepare
    from secagg.transport.grpc_client import Connection, Site, join
    from secagg.transport.grpc_wire import Hello

    kit = load_kit(kit_dir, "client")
    workdir.mkdir(parents=True, exist_ok=True)
    connection = Connection(kit, f"localhost:{port}")
    joined = join(connection, Hello(), 30, lambda line: None)
    _, client, identities = _prepare(kit, joined, "data", False, "cpu", True)
    site = Site(connection, client, joined, workdir, lambda line: None, identities, kit.certificate)
    connection.call("Join", Hello(0, 1, client.signature, site.mask_key()).to_wire())
    return site


class ManualSite:
    """site-2 driven by hand: a real site behind the raw RPCs, replaying on purpose."""

    def __init__(self, kit_dir: Path, port: int, workdir: Path) -> None:
        self.site = joined_site(kit_dir, port, workdir)
        self.connection = self.site.connection

    def play_round_with_replays(self) -> None:
        from secagg.errors import PayloadError
        from secagg.transport.grpc_wire import UploadHeader

        after, first_update = 0, None
        while True:
            task = self.connection.call("Task", {"after": after, "wait": 5})
            if task["kind"] == "done":
                return
            if task["kind"] in ("wait", "catchup"):
                continue
            after = task["id"]
            if task["kind"] != "seal":
                getattr(self.site, f"do_{task['kind']}")(task)
                continue
            mine = self.site.round_stamp(task["round"]).for_sender(1)
            scales = self.connection.download(task["round"], "scales")
            reply = self.site.client.seal(mine, task["total_samples"], scales)
            header = UploadHeader(task["id"], seconds=reply.seconds).to_wire()
            if first_update is not None:  # round 1's update again: a stale replay
                with pytest.raises(PayloadError, match="round 1, expected round 2"):
                    self.connection.upload(header, first_update)
            self.connection.upload(header, reply.payload)
            # the same one twice: a duplicate, or stale once its upload closed the phase
            with pytest.raises(PayloadError, match=r"duplicate|stale or replayed"):
                self.connection.upload(header, reply.payload)
            first_update = first_update or reply.payload


def torch_cpu():  # type: ignore[no-untyped-def]
    import torch

    return torch.device("cpu")


@pytest.mark.slow
def test_status_shows_the_job_and_abort_stops_it(tmp_path: Path) -> None:
    project, port = _project(tmp_path, 2)
    job, _ = _job(tmp_path, clients=2, rounds=500, local_epochs=20)  # long enough to abort
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port)
    sites = [_site(project, name, work) for name in ("site-1", "site-2")]
    admin = ["--kit", str(project / "admin")]
    try:
        _wait_for(lambda: _applied(work, "site-1") >= 1, what="round 1")
        env = {**ENV}
        status = subprocess.run(
            [*SECAGG, "status", *admin], capture_output=True, text=True, env=env, timeout=60
        )
        assert status.returncode == 0, status.stderr
        assert "site-1" in status.stdout and "connected" in status.stdout
        assert "rounds done" in status.stdout
        stop = subprocess.run(
            [*SECAGG, "abort", *admin, "--reason", "maintenance"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert stop.returncode == 0, stop.stderr
        out = _finish(server)
        assert server.returncode == 1 and "maintenance" in out
        for site in sites:
            text = _finish(site, 60)
            assert site.returncode == 1, text[-2000:]
            assert text.strip().splitlines()[-1] == (
                "Error: the job ended unfinished: aborted by the administrator: maintenance"
            )
    finally:
        _kill_all(server, *sites)
    # A site's kit is not an admin kit.
    wrong = subprocess.run(
        [*SECAGG, "status", "--kit", str(project / "site-1")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert wrong.returncode == 1 and "pass the admin kit" in wrong.stderr


def test_a_payload_far_over_grpcs_message_limit_streams_intact(tmp_path: Path) -> None:
    """An 11 MB HE update (gRPC refuses messages over 4 MiB by default) goes up in chunks, is
    checked and queued by the real service, and comes back down byte for byte."""
    sys.path.insert(0, str(ROOT))
    from bench.stream import stream

    result = stream(4_000_000, tmp_path)
    assert result["payload_bytes"] > 2 * 4 * 2**20
    assert result["payload_bytes"] / result["params"] < 3


def _assert_models_as_in_process(
    work: Path,
    config: RunConfig,
    keys: Path,
    transport_class: type[InProcessTransport],
    names: tuple[str, ...],
) -> None:
    """Each named site ends with the model of the same job run unmasked in one process, with
    ``transport_class`` (which may drop the same clients), bit for bit."""
    from secagg import crypto, rounds
    from secagg.builtin import task_for
    from secagg.job import build_clients
    from secagg.server import Server

    local = replace(config, masking=False, keys_dir=str(keys), device="cpu")
    transport = transport_class(build_clients(local, task_for(local)))
    server_side = Server(crypto.for_server(True, keys))
    rounds.run(server_side, transport, bytes(16), range(1, config.rounds + 1), lambda m: None)
    reference = transport.slots[0].model.state_dict()
    for name in names:
        model = torch.load(work / name / "model.pt")
        for key, value in reference.items():
            assert torch.equal(model[key], value), (name, key)


class _LosesOne(InProcessTransport):
    """The in-process reference of the dropouts below: in round 2, position 2 sends nothing
    (the one lost while unmasking sent all it had to)."""

    def train(self, round_stamp: Stamp) -> list[TrainReply]:
        replies = super().train(round_stamp)
        return [r for r in replies if round_stamp.round_num != 2 or r.client_id != 2]

    def seal(self, round_stamp: Stamp, total: int, scales: bytes | None) -> Iterator[FitReply]:
        for position, slot in enumerate(self.slots):
            if round_stamp.round_num != 2 or position != 2:
                yield slot.seal(round_stamp.for_sender(position), total, scales)


@pytest.mark.slow
def test_a_site_lost_before_upload_and_one_lost_while_unmasking_in_one_round(
    tmp_path: Path, session_keys: Path
) -> None:
    """Round 2 of a masked job loses site-3 once it has advertised and agreed the round's
    keys (it sends nothing), and site-4 after it confirmed the update's survivors, before it
    reveals: the survivors reveal their shares of site-3's mask keys and of site-4's
    self-mask key, the server rebuilds both, and every site ends with the model of an
    unmasked in-process run that loses site-3 alone, bit for bit."""
    project, port = _project(tmp_path, 4)
    job, config = _job(tmp_path, clients=4, rounds=2, min_clients=2, round_timeout=60.0)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port)
    faults = [None, None, "die-after-keys:2", "die-at-reveal:2"]
    sites = [_site(project, f"site-{i + 1}", work, fault) for i, fault in enumerate(faults)]
    try:
        out = _finish(server)
        assert server.returncode == 0, out[-3000:]
        assert "site-4 sent no mask reveal in time; their keys for the update are rebuilt" in out
        assert "the update lost site-3; their mask keys are rebuilt" in out
        logs = [_finish(site, 60) for site in sites[:2]]
    finally:
        _kill_all(server, *sites)
    results = json.loads((work / "server" / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [4, 3]
    for log in logs:
        assert "round 2: revealing its shares of the mask keys of 1 lost site(s)" in log
    assert json.loads((work / "site-1" / "metrics.json").read_text())["rounds"][-1][
        "contributors"
    ] == [0, 1, 3]

    _assert_models_as_in_process(work, config, session_keys, _LosesOne, ("site-1", "site-2"))


@pytest.mark.slow
def test_a_site_lost_while_the_round_unmasks_is_rebuilt_from_shares(
    tmp_path: Path, session_keys: Path
) -> None:
    """site-3 confirms round 2's survivors, then dies before revealing its self-mask key:
    the server rebuilds the key from the shares site-1 and site-2 reveal (checked against
    site-3's commitment), the round completes with all three updates, and the survivors end
    with the model of an unmasked in-process run in which nobody dropped, bit for bit."""
    project, port = _project(tmp_path, 3)
    job, config = _job(tmp_path, rounds=2, min_clients=2, round_timeout=60.0)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port)
    faults = [None, None, "die-at-reveal:2"]
    sites = [_site(project, f"site-{i + 1}", work, fault) for i, fault in enumerate(faults)]
    try:
        out = _finish(server)
        assert server.returncode == 0, out[-3000:]
        assert "site-3 sent no mask reveal in time; their keys for the update are rebuilt" in out
        for site in sites[:2]:
            _finish(site, 60)
    finally:
        _kill_all(server, *sites)
    results = json.loads((work / "server" / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [3, 3]

    _assert_models_as_in_process(
        work, config, session_keys, InProcessTransport, ("site-1", "site-2")
    )


@pytest.mark.slow
def test_a_mask_key_the_server_substitutes_is_caught_by_name(tmp_path: Path) -> None:
    """The server relays, in site-2's place, a key signed with a site-2 certificate of
    another CA (a man in the middle whose signature verifies): site-1 and site-3 refuse it
    before they mask anything, stop with one line naming site-2, and tell the server."""
    project, port = _project(tmp_path, 3)
    other, _ = _project(tmp_path / "other", 3)
    job, _ = _job(tmp_path, rounds=2, round_timeout=30.0)
    work = tmp_path / "work"
    forged = f"forge-key:{other / 'site-2'}"
    server = _server(project, job, work / "server", port, fault=forged)
    sites = {name: _site(project, name, work) for name in ("site-1", "site-2", "site-3")}
    try:
        for name in ("site-1", "site-3"):
            out = _finish(sites[name], 120)
            assert sites[name].returncode == 1, out[-3000:]
            assert out.strip().splitlines()[-1] == (
                "Error: site-2's relayed certificate is not signed by this project's CA: it was "
                "substituted on the way (the server or the network); this site will not use it"
            )
        time.sleep(1)  # the server logs each site's Fail as it comes
        server.kill()
        out = server.communicate()[0]
        assert "site-1 failed: site-2's relayed certificate is not signed" in out, out[-3000:]
    finally:
        _kill_all(server, *sites.values())


class _ScriptedServer:
    """A server as a site sees it: a seal task per round, then the end; records every call."""

    def __init__(self, rounds: int) -> None:
        self.tasks = [
            {"kind": "seal", "id": i + 1, "round": i + 1, "total_samples": 8} for i in range(rounds)
        ]
        self.tasks.append({"kind": "done", "id": rounds + 1})
        self.calls: list[tuple[str, dict]] = []

    def call(self, name: str, message: dict, timeout: float = 0) -> dict:
        self.calls.append((name, message))
        return self.tasks.pop(0) if name == "Task" else {}

    def download(self, round_num: int, what: str) -> bytes:
        return b"scales of round %d" % round_num

    def upload(self, header: dict, payload: bytes) -> None:
        raise PayloadError("the server refused the payload: duplicate", "duplicate")


class _Sealing:
    """A site's client whose scale aggregate fails its checks (or whose upload is refused)."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason
        self.config = RunConfig(he=True)

    def seal(self, stamp, total_samples, scales):  # type: ignore[no-untyped-def]
        from secagg.messages import Seconds

        if self.reason is not None:
            raise PayloadError("aggregate does not decrypt to integers", self.reason)
        return FitReply(stamp.sender, b"update", Seconds(), 6)


def test_a_site_stops_at_a_scale_aggregate_that_fails_its_checks() -> None:
    """README, no decryption oracle: a scale aggregate that does not decrypt stops the site,
    which tells the server why, by reason code only; a payload the server refuses does not."""
    from secagg.transport.grpc_client import Joined, Site

    joined = Joined(bytes(16), 0, 2, {}, 0, "")
    server = _ScriptedServer(rounds=2)
    site = Site(server, _Sealing("not-integer"), joined, Path("."), lambda line: None)  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="does not decrypt"):
        site.run()
    assert [name for name, _ in server.calls if name != "Ping"] == ["Task", "Fail"]
    # The server hears the reason code only: what the site decrypted stays on the site.
    told = next(message["error"] for name, message in server.calls if name == "Fail")
    assert (
        told == "refused round 1's aggregate (not-integer); the details are in this site's own log"
    )
    server = _ScriptedServer(rounds=2)
    refused = Site(server, _Sealing(None), joined, Path("."), lambda line: None)  # type: ignore[arg-type]
    assert refused.run() == "done"
    assert "Fail" not in [name for name, _ in server.calls]


class _Scales:
    """A server whose round 3 was tried again with other members: other summed scales."""

    def __init__(self) -> None:
        self.served = b"scales of attempt 1"
        self.downloads = 0

    def download(self, round_num: int, what: str) -> bytes:
        self.downloads += 1
        return self.served


def test_a_retried_round_never_decodes_on_an_earlier_attempts_scales() -> None:
    """A site keeps the scales it sealed with; the round is tried again with other members,
    so their sum changes. The apply task names the scales by digest: the site's copy is used
    only when it is the named one, and a catching-up site (no task) always downloads. Kept by
    round number alone, the old copy decoded the new aggregate on the old steps: a silent
    fork of the site's model."""
    import hashlib

    from secagg.transport.grpc_client import Joined, Site

    server = _Scales()
    joined = Joined(bytes(16), 0, 2, {}, 0, "")
    site = Site(server, _Sealing(None), joined, Path("."), lambda line: None)  # type: ignore[arg-type]
    first = hashlib.sha256(server.served).hexdigest()
    assert site._fetch_scales(3, first) == b"scales of attempt 1"
    assert site._fetch_scales(3, first) == b"scales of attempt 1"
    assert server.downloads == 1  # the same attempt's copy is reused
    server.served = b"scales of attempt 2"
    second = hashlib.sha256(server.served).hexdigest()
    assert site._fetch_scales(3, second) == b"scales of attempt 2"
    assert site._fetch_scales(3, None) == b"scales of attempt 2"  # catching up: downloaded
    assert server.downloads == 3
    with pytest.raises(PayloadError, match="not the ones its task names"):
        site._fetch_scales(3, first)


class _Training:
    """A site's client that counts its adverts and training runs; each is fresh bytes."""

    def __init__(self) -> None:
        self.config = RunConfig(he=True)
        self.advertised = self.trained = 0

    def advertise(self, stamp, peers, nonce):  # type: ignore[no-untyped-def]
        from secagg.crypto.masking import Advert, Advertised

        self.advertised += 1
        advert = Advert(stamp.sender, os.urandom(96), os.urandom(64))
        return Advertised(advert, {1: os.urandom(8)}, os.urandom(64))

    def train(self, stamp, adverts, sealed, nonce):  # type: ignore[no-untyped-def]
        from secagg.messages import TrainReply

        self.trained += 1
        return TrainReply(stamp.sender, 0, os.urandom(32))


class _Uploads:
    def __init__(self) -> None:
        self.uploads: list[tuple[dict, bytes]] = []

    def upload(self, header: dict, payload: bytes) -> None:
        self.uploads.append((header, payload))


WIDE_TASK = """
import os

from torch import nn

from secagg.builtin import Classification


class Digits(Classification):
    def build_model(self) -> nn.Module:
        model = super().build_model()
        if os.environ.get("WIDE_MODEL"):  # a site whose copy of the task was changed
            model.add_module("extra", nn.Linear(4, 4))
        return model
"""


@pytest.mark.slow
def test_the_job_not_the_first_site_fixes_the_model(tmp_path: Path) -> None:
    """A site with another model joins first: it is refused by name, and the sites with the
    job's model run the job (the server built the model from the job, in a child process)."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "widetask.py").write_text(WIDE_TASK)
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'tasks'}{os.pathsep}{ROOT}"}
    project, port = _project(tmp_path, 3, protection="plain")
    job, _ = _job(tmp_path, task="widetask:Digits", he=False, min_clients=2, round_timeout=30.0)
    work = tmp_path / "work"
    server = subprocess.Popen(
        [*SECAGG, "server", str(job), "--kit", str(project / "server"), "--workdir",
         str(work / "server"), "--bind", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    wrong = _site(project, "site-1", work, env={**env, "WIDE_MODEL": "1"})
    sites = []
    try:
        refused = _finish(wrong, 120)
        assert wrong.returncode == 1
        assert refused.strip().splitlines()[-1] == (
            "Error: the server refused this site: site-1's model is not the job's: it has "
            "'extra.weight' (2 entries differ)"
        ), refused[-2000:]
        sites = [_site(project, name, work, env=env) for name in ("site-2", "site-3")]
        out = _job_done(server, sites)
    finally:
        _kill_all(server, wrong, *sites)
    assert "(plaintext, rounds 1-2; model MLP, 9,610 parameters)" in out, out[:2000]
    rounds = json.loads((work / "server" / "results.json").read_text())["rounds"]
    assert [r["clients"] for r in rounds] == [2, 2]


@pytest.mark.slow
def test_a_site_that_inflates_its_count_fails_the_round_not_the_sites(tmp_path: Path) -> None:
    """A site encrypts a count far over max_client_samples: the honest sites read the total
    (after its integrity tag: the server could not have made it) and decline the round, which
    is tried again, then fails with the reason; no site stops at the lie itself."""
    project, port = _project(tmp_path, 3)
    job, _ = _job(tmp_path, rounds=2, round_retries=1, round_timeout=30.0)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port)
    sites = [_site(project, "site-1", work, fault="lie-count")]
    sites += [_site(project, name, work) for name in ("site-2", "site-3")]
    try:
        out = _finish(server)
        logs = [_finish(site, 60) for site in sites]
    finally:
        _kill_all(server, *sites)
    assert server.returncode == 1, out[-3000:]
    assert "site-2 declines round 1: the sites' summed scales break the bounds" in out
    assert "trying round 1 again" in out
    for log in logs[1:]:
        assert "round 1: declining the round: the round's 3 site(s) claim" in log, log[-2000:]
        assert (
            log.strip()
            .splitlines()[-1]
            .startswith("Error: the job ended unfinished: the job failed: round 1:")
        ), log[-2000:]
        assert "refused round" not in log  # not stopped as at a forged aggregate


def test_a_server_that_cannot_build_the_jobs_model_says_why_in_one_line(tmp_path: Path) -> None:
    project, port = _project(tmp_path, 2)
    job, _ = _job(tmp_path, task="nosuchpackage.tasks:Thing")
    server = _server(project, job, tmp_path / "work", port)
    out = _finish(server, 120)
    assert server.returncode == 1
    assert out.strip().splitlines()[-1] == (
        "Error: the server could not build the job's model to check sites against: task "
        "'nosuchpackage.tasks:Thing': no module named 'nosuchpackage'; install its package or "
        "add its folder to PYTHONPATH (the task's package and torch must be importable where "
        "the server runs)"
    ), out[-2000:]


@pytest.mark.slow
def test_a_site_whose_server_is_gone_for_its_wait_stops_with_the_reason(tmp_path: Path) -> None:
    """The server dies and does not come back: each site reconnects for ``--wait`` seconds in
    all, not forever, then stops, exit 1, saying so."""
    project, port = _project(tmp_path, 2)
    job, _ = _job(tmp_path, rounds=3)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port, fault="crash-unmasked:1")
    sites = [_site(project, name, work, wait=6) for name in ("site-1", "site-2")]
    try:
        _finish(server)
        gone = time.monotonic()
        for site in sites:
            out = _finish(site, 60)
            assert site.returncode == 1, out[-2000:]
            assert "Error: lost the server for 6 s" in out.strip().splitlines()[-1], out[-2000:]
        assert time.monotonic() - gone < 30
    finally:
        _kill_all(server, *sites)


def test_a_site_the_server_does_not_know_joins_again() -> None:
    """A restarted server hands a site it has not seen join no task but ``rejoin``; the site
    joins again (its uploads to the old server were refused as stale, never a stall)."""
    from secagg.transport.grpc_client import Joined, ServerGone, Site

    server = _ScriptedServer(rounds=0)
    server.tasks = [{"kind": "rejoin", "id": 0}]
    joined = Joined(bytes(16), 0, 2, {}, 0, "")
    site = Site(server, _Sealing(None), joined, Path("."), lambda line: None)  # type: ignore[arg-type]
    with pytest.raises(ServerGone, match="join again"):
        site.run()


def test_a_resumed_attempt_gets_the_same_bytes_and_never_a_second_masked_payload() -> None:
    """A restarted server resumes the attempt it was running: asked the same again, a site
    sends what it sent, byte for byte (no new keys, no new training, no new masks); asked
    under the same attempt with other mask keys, it sits out rather than mask anything
    twice."""
    from secagg.crypto.masking import SignedKey
    from secagg.transport.grpc_client import Joined, Site

    server, client = _Uploads(), _Training()
    joined = Joined(bytes(16), 0, 2, {}, 0, "")
    site = Site(server, client, joined, Path("."), lambda line: None)  # type: ignore[arg-type]
    keys = [SignedKey(0, b"a" * 32, b""), SignedKey(1, b"b" * 32, b"")]
    site._peers = lambda task: keys  # type: ignore[method-assign]
    advertise = {"kind": "advertise", "id": 3, "round": 2, "nonce": "ab" * 16}
    task = {"kind": "train", "id": 4, "round": 2, "nonce": "ab" * 16}
    for asked in (advertise, task):
        getattr(site, f"do_{asked['kind']}")(asked)
        getattr(site, f"do_{asked['kind']}")({**asked, "id": asked["id"] + 5})  # asked again
    assert (client.advertised, client.trained) == (1, 1)
    (advert, advert_bytes), (advert_again, advert_resent) = server.uploads[:2]
    assert advert_resent == advert_bytes and {**advert_again, "task": 3} == advert
    (first, sent), (again, resent) = server.uploads[2:]
    assert resent == sent and {**again, "task": 4} == first and again["task"] == 9
    keys[1] = SignedKey(1, b"c" * 32, b"")  # the same attempt, another peer key
    site.do_advertise({**advertise, "id": 12})
    assert client.advertised == 1
    header, payload = server.uploads[-1]
    assert header["task"] == 12 and header.get("sitting_out") and payload == b""
    site.do_advertise({**advertise, "id": 13, "nonce": "cd" * 16})  # a new attempt: new keys
    site.do_train({**task, "id": 14, "nonce": "cd" * 16})
    assert (client.advertised, client.trained) == (2, 2)


# --- a lying server --------------------------------------------------------------------------


def _low_bits_of_view(
    kit: Path, victim: bytes, minus: list[np.ndarray], kind: int | None = None
) -> np.ndarray:
    """What a colluding site (its kit's secret key) decrypts from the victim's update (or
    another payload of ``kind``) once the words ``minus`` (mask words the server learned)
    are taken off: each slot's low 8 bits."""
    from secagg import keys
    from secagg.crypto import envelope, rlwe
    from secagg.crypto.ckks import CkksClient
    from secagg.crypto.packing import packing_for
    from secagg.crypto.seal_format import from_wire

    loaded = keys.load_for_client(kit)
    client = CkksClient(loaded)
    q, n = client._shape.modulus, client._shape.poly_modulus_degree

    def opened(payload: bytes, kind: int) -> envelope.Envelope:
        head = envelope._HEAD.unpack_from(payload)
        stamp = Stamp(head[6], head[7], head[8], head[9], head[4])
        return client._format.open(payload, stamp, kind)

    update = opened(victim, envelope.UPDATE if kind is None else kind)
    words = from_wire(update.body, q).copy()
    for taken in minus:
        words = (words + q - taken.reshape(-1)) % q
    phase = rlwe.SecretKey(loaded.context, client._shape).decrypt(
        words.reshape(-1, n), update.seeds
    )
    bits = packing_for(update.stamp.roster).scale_bits
    return ((phase + (1 << (bits - 1))) >> bits).reshape(-1) % 256


def test_a_server_that_lies_about_a_dropout_unmasks_nothing(tmp_path: Path) -> None:
    """A patched server holds site-1's update yet tells site-2 and site-3 that site-1 dropped
    out: they reveal their shares of its mask key, from which the server rebuilds every pair
    mask on site-1's update. A colluding site decrypting site-1's update minus all its pairs
    gets slots whose low bits are uniform (chi-square): site-1's self-mask, whose key only
    site-1 holds and no survivor revealed a share of, is still on. The round cannot
    complete, and the job fails rather than decrypt anything."""
    from scipy import stats

    dump = tmp_path / "dump"
    out, project, _ = _lying_server(tmp_path, f"lie-dropout:{dump}", retries=0)
    assert "could not unmask the sum" in out, out[-3000:]
    pairs = np.load(dump / "pairs.npy")  # rebuilt from the honest sites' shares
    seen = _low_bits_of_view(project / "site-3", (dump / "victim.bin").read_bytes(), [pairs])
    assert stats.chisquare(np.bincount(seen, minlength=256)).pvalue > 1e-3


def test_a_curious_server_reads_no_sites_count_or_metrics(tmp_path: Path) -> None:
    """Every message the server receives from the sites, recorded as it arrives: no training
    count or metric and no evaluation in plain, only ciphertexts; the sites that can name the
    metrics tell it the averages they decrypted, all the same, which it logs."""
    project, port = _project(tmp_path, 3)
    job, _ = _job(tmp_path, rounds=2)
    work, dump = tmp_path / "work", tmp_path / "dump"
    server = _server(project, job, work / "server", port, fault=f"record:{dump}")
    sites = [_site(project, f"site-{i}", work) for i in (1, 2, 3)]
    try:
        _job_done(server, sites)
    finally:
        _kill_all(server, *sites)
    seen = [json.loads(line) for line in (dump / "seen.jsonl").read_text().splitlines()]
    kinds = {entry["kind"] for entry in seen}
    assert {"train", "seal", "report", "evaluate", "average"} <= kinds, kinds
    for entry in seen:
        message = entry["message"]
        assert not message.get("samples"), entry  # no count in plain
        assert "eval" not in message, entry  # no site's evaluation in plain
        if entry["kind"] in ("train", "evaluate"):
            assert message["metrics"] == {}, entry
    rounds = json.loads((work / "server" / "results.json").read_text())["rounds"]
    for number, logged in enumerate(rounds, 1):
        views = [
            e["message"]["metrics"]
            for e in seen
            if e["kind"] == "average" and e["message"]["metrics"] and _round_of(e, seen) == number
        ]
        assert views and all(v == views[0] for v in views), views
        assert views[0]["accuracy"] == logged["metrics"]["accuracy"] > 0.5
        assert logged["metrics"]["train_loss"] > 0  # the averages of the sites' seal uploads


def _round_of(entry: dict, seen: list[dict]) -> int:
    """The round a recorded upload belongs to: the number of train uploads of its site
    recorded before it."""
    before = seen[: seen.index(entry)]
    return sum(1 for e in before if e["kind"] == "train" and e["site"] == entry["site"])


def test_a_ciphertext_replayed_from_an_earlier_attempt_unmasks_nothing(tmp_path: Path) -> None:
    """A patched server fails round 1 once its scales are in, and in the retry puts site-1's
    scale payload of the first attempt in place of its fresh one (a valid ciphertext, whose
    envelope passes). Its masks were drawn for the first attempt, so the retry's unmasking
    leaves them on: what a colluding site decrypts from the retry's sum has uniform low bits
    (chi-square), and every site refuses the sum, naming it, instead of decoding it."""
    from scipy import stats

    from secagg.crypto import envelope

    dump = tmp_path / "dump"
    out, project, logs = _lying_server(tmp_path, f"replay-attempt:{dump}", retries=1)
    assert "trying round 1 again" in out, out[-3000:]
    seen = _low_bits_of_view(
        project / "site-3", (dump / "scales.bin").read_bytes(), [], envelope.AGGREGATE
    )
    assert stats.chisquare(np.bincount(seen, minlength=256)).pvalue > 1e-3
    for log in logs:
        assert "sending" not in log, log[-3000:]  # no site sealed an update on those scales
        last = log.strip().splitlines()[-1]
        assert last.startswith("Error: aggregate does not decrypt") and "replayed" in last, log


def test_sites_refuse_a_round_smaller_than_the_kits_threshold(tmp_path: Path) -> None:
    """The kits' policy says 3 (the default for 3 sites); a patched server keys the round to
    two sites. Both stop before training, with one line naming the server's claim, and tell
    the server why."""
    project, port = _project(tmp_path, 3, threshold=0)
    job, _ = _job(tmp_path, rounds=1, round_timeout=30.0)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port, fault="lie-small:2")
    sites = {name: _site(project, name, work) for name in ("site-1", "site-2", "site-3")}
    try:
        for name in ("site-1", "site-2"):
            out = _stopped_with(
                sites[name],
                "Error: the server's round hands keys to 2 site(s), fewer than the round "
                "policy's threshold of 3",
            )
            assert "sending" not in out  # refused before anything left the site
    finally:
        _kill_all(server, *sites.values())


def test_a_survivor_set_shown_differently_is_caught_by_name(tmp_path: Path) -> None:
    """A patched server shows site-1 a survivor set without site-3 and the others the true
    one. site-1 signs only what it was shown, finds too few confirmations of it, reveals
    nothing and stops, naming the site whose confirmation is of another set."""
    project, port = _project(tmp_path, 3)
    job, _ = _job(tmp_path, rounds=1, round_retries=0, round_timeout=30.0)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port, fault="lie-split")
    sites = {name: _site(project, name, work) for name in ("site-1", "site-2", "site-3")}
    try:
        out = _finish(sites["site-1"], 180)
        assert sites["site-1"].returncode == 1, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith("Error: only 1 of the 2 confirmations needed"), out[-3000:]
        assert "site-2] signed another set (the server showed sites different survivor" in last
    finally:
        _kill_all(server, *sites.values())


def test_a_round_retried_after_its_update_was_unmasked_gets_no_update_twice(
    tmp_path: Path,
) -> None:
    """A patched server unmasks round 1's update, then says the round failed and tries it
    again: a colluding site could difference the two sums (over S, then S minus a victim) if
    a site sent its update twice. Every site that revealed its key sits the retry out, sends
    its update once, and the retry ends for lack of sites."""
    out, _, logs = _lying_server(tmp_path, "lie-retry", retries=1, round_timeout=10.0)
    assert "trying round 1 again" in out, out[-3000:]
    assert "only 0 site(s) advertised their keys" in out, out[-3000:]
    # Each says so at once: the server does not wait out the phase for them.
    assert out.count("sits round 1 out: it sent its update in an earlier attempt") == 3
    for log in logs:
        assert log.count("round 1: sending") == 1, log[-3000:]
        assert "already revealed its masks for round 1" in log and "sits the round out" in log


@pytest.mark.parametrize(
    ("fault", "refusal"),
    [
        ("bad-key", "site-3's mask key is refused, and the site is left out"),
        ("bad-advert", "site-3's attempt keys are refused, and the site is left out of the round"),
    ],
)
def test_a_site_with_a_badly_signed_mask_key_is_left_out_and_the_others_finish(
    tmp_path: Path, fault: str, refusal: str
) -> None:
    """site-3 joins with its job key, or advertises its attempt keys, signed wrongly: the
    server refuses them at the door, by name (relayed, they would stop every honest site),
    and site-1 and site-2 finish the job."""
    project, port = _project(tmp_path, 3)
    job, _ = _job(tmp_path, rounds=1, min_clients=2, round_timeout=30.0)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port)
    sites = [_site(project, f"site-{i}", work, fault if i == 3 else None) for i in (1, 2, 3)]
    try:
        out = _finish(server)
        assert server.returncode == 0, out[-3000:]
        for site in sites[:2]:
            assert "the job is done" in _finish(site, 60)
    finally:
        _kill_all(server, *sites)
    assert refusal in out, out[-3000:]
    assert [
        r["clients"] for r in json.loads((work / "server" / "results.json").read_text())["rounds"]
    ] == [2]


def test_a_round_retried_with_other_members_leaves_every_site_the_same_model(
    tmp_path: Path,
) -> None:
    """Round 1 is sealed by site-1 and site-2 (which fetch its scales), fails, and is tried
    again by site-3 and site-4. Every site applies the retry's aggregate with the retry's
    scales (named by digest and attempt; a copy kept by round number decoded it on the first
    attempt's steps, a silent fork): all four end with the same model, bit for bit."""
    project, port = _project(tmp_path, 4)
    job, _ = _job(tmp_path, clients=4, rounds=2, min_clients=2, round_timeout=60.0)
    work = tmp_path / "work"
    server = _server(project, job, work / "server", port, fault="retry-split")
    sites = [_site(project, f"site-{i}", work) for i in (1, 2, 3, 4)]
    try:
        out = _finish(server)
        assert server.returncode == 0, out[-3000:]
        assert "trying round 1 again" in out
        logs = [_finish(site, 60) for site in sites]
    finally:
        _kill_all(server, *sites)
    assert all("the job is done" in log for log in logs)
    rounds = json.loads((work / "server" / "results.json").read_text())["rounds"]
    assert [r["clients"] for r in rounds] == [2, 4]
    models = [torch.load(work / f"site-{i}" / "model.pt") for i in (1, 2, 3, 4)]
    for key, value in models[0].items():
        assert all(torch.equal(m[key], value) for m in models[1:]), key


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"he": False}, "the server's job is plaintext FedAvg, but this project's kits require HE"),
        ({"masking": False}, "the server's job is HE without pairwise masks, but"),
    ],
)
def test_a_server_that_turns_protection_off_gets_no_update(
    tmp_path: Path, change: dict[str, object], named: str
) -> None:
    """The kits require masked HE (the default, signed by the CA). An honest server refuses
    to serve a weaker job; a patched one that serves it anyway gets no site's update: every
    site stops, naming the downgrade, and the server ends the job with their reason."""
    project, port = _project(tmp_path, 2)
    job, _ = _job(tmp_path, clients=2, min_clients=2, round_timeout=30.0, **change)
    honest = subprocess.run(
        [*SECAGG, "server", str(job), "--kit", str(project / "server"), "--workdir",
         str(tmp_path / "honest"), "--bind", f"127.0.0.1:{port}", "--no-tracking"],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert honest.returncode != 0 and "every site would refuse it" in honest.stderr
    server = _server(project, job, tmp_path / "server", port, fault="skip-policy")
    sites = [_site(project, name, tmp_path, wait=30) for name in ("site-1", "site-2")]
    try:
        outs = [site.communicate(timeout=120)[0] for site in sites]
        out = server.communicate(timeout=120)[0]
    finally:
        _kill_all(server, *sites)
    for site, text in zip(sites, outs, strict=True):
        assert site.returncode != 0 and named in text, text[-2000:]
    assert named in out and "round   1" not in out, out[-2000:]
