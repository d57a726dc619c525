"""One hostile site (a stolen or buggy site certificate) against a real server on loopback:
every bad message is refused to it by name, the server stays small and answers its admin,
and the honest sites end the job with the model they reach without the hostile site."""

from __future__ import annotations

import json
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from test_deploy import (
    ENV,
    SECAGG,
    _job,
    _job_done,
    _kill_all,
    _project,
    _reachable,
    _server,
    _site,
    _wait_for,
    joined_site,
)

from secagg import quantize
from secagg.crypto import Stamp
from secagg.crypto.ledger import Update
from secagg.errors import PayloadError
from secagg.transport import grpc_wire as wire
from secagg.transport.grpc_client import ServerGone
from secagg.transport.grpc_wire import Report, UploadHeader

#: The server process's resident memory must stay under this (MB) whatever the attacker
#: sends; an idle server of the digits job holds about 100-150 MB.
RSS_LIMIT_MB = 400
#: Offset of the blob size (u64) in an envelope's fixed header.
BLOB_SIZE_AT = 68


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Attacker:
    """site-3's kit in the test's hands: a real Client for honest-looking payloads, raw
    RPCs for the rest."""

    def __init__(self, kit_dir: Path, port: int, workdir: Path) -> None:
        self.site = joined_site(kit_dir, port, workdir)
        self.client = self.site.client
        self.connection = self.site.connection
        self.job = self.site.joined.job
        self.index = self.site.joined.index
        self.stop = threading.Event()
        threading.Thread(target=self._ping, daemon=True).start()

    def _ping(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.connection.call("Ping", {}, timeout=5)
            except Exception:
                continue

    def stalled_streams(self, count: int, header: dict | None = None) -> list[grpc.Future]:
        """``count`` uploads that send ``header`` (or nothing) and then nothing more."""

        def stall() -> Iterator[bytes]:
            if header is not None:
                yield wire.encode(header)
            self.stop.wait()

        rpc = self.connection.channel.stream_unary(wire.path("Upload"))
        return [rpc.future(stall(), timeout=120) for _ in range(count)]

    def refused(self, call) -> str:  # type: ignore[no-untyped-def]
        """The reason the server gave for refusing ``call``."""
        with pytest.raises(PayloadError) as caught:
            call()
        return caught.value.reason

    def scales(self, round_num: int, extra: int = 0) -> bytes:
        """A well-formed, correctly encrypted scale payload, with ``extra`` values more."""
        stamp = Stamp(self.job, round_num, self.index, 3).scales()
        inner = self.client.cipher.inner  # type: ignore[attr-defined]
        size = quantize.histogram_values(e.size for e in self.client.layout.entries) + extra
        return bytes(inner.encrypt(Update(np.zeros(size), 1 / 3), stamp))

    def huge(self, header: dict, payload: bytes, declared: int) -> str:
        """Send a payload whose envelope declares ``declared`` bytes, then up to 1 GiB."""
        patched = bytearray(payload)
        count = struct.unpack_from(">I", patched, BLOB_SIZE_AT - 4)[0]
        struct.pack_into(">Q", patched, BLOB_SIZE_AT, declared // count)
        sent = [0]

        def messages() -> Iterator[bytes]:
            yield wire.encode(header)
            yield bytes(patched[: wire.CHUNK])
            filler = bytes(wire.CHUNK)
            while sent[0] < 1 << 30 and not self.stop.is_set():
                sent[0] += len(filler)
                yield filler

        rpc = self.connection.channel.stream_unary(wire.path("Upload"))
        with pytest.raises(grpc.RpcError) as caught:
            rpc(messages(), timeout=60)
        assert sent[0] < 256 << 20, f"the server read {sent[0]} bytes of a refused payload"
        return str(caught.value.details())

    def bad_messages(self) -> list[str]:
        details = []
        for method, message in (
            ("Task", {"after": "x"}),
            ("Task", {"wait": 1e9}),
            ("Task", {"after": -1}),
            ("Download", {"round": "1", "what": "update"}),
            ("Download", {"round": 1, "what": "../../state.json"}),
        ):
            rpc = self.connection.channel.unary_unary(wire.path(method))
            with pytest.raises(grpc.RpcError) as caught:
                call = rpc(wire.encode(message), timeout=10)
                if method == "Download":
                    list(call)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            details.append(str(caught.value.details()))
        return details

    def play(self, server_pid: int, admin: Path, log: list[str], peak: list[float]) -> None:
        """One attack per round (rounds 1-4); claim to have applied each round, so the server
        asks this site again in the next; never contribute anything."""
        # Before any round: 50 uploads that never send a byte, then the admin asks.
        flood = self.stalled_streams(50)
        status = subprocess.run(
            [*SECAGG, "status", "--kit", str(admin)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        log.append(f"status answered during the flood: {'rounds done' in status.stdout}")
        codes = [f.exception(timeout=30).code() for f in flood]  # type: ignore[union-attr]
        busy = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        log.append(f"{busy} busy, {codes.count(grpc.StatusCode.CANCELLED)} cut")
        log.extend(self.bad_messages())
        after = 0
        while True:
            peak[0] = max(peak[0], _rss_mb(server_pid))
            try:
                task = self.connection.call("Task", {"after": after, "wait": 2}, timeout=10)
            except ServerGone:
                return  # the server ended the job and exited
            kind = task["kind"]
            if kind in ("done", "abort"):
                return
            if kind == "catchup":
                self.claim(None, int(task["completed"]))
                continue
            if kind == "wait":
                continue
            after = task["id"]
            round_num = task["round"]
            if kind == "apply":  # reports, so the phase need not wait for it
                self.claim(task["id"], round_num)
                continue
            if kind == "advertise":  # honest keys, so that it is asked to train
                self.site.do_advertise(task)
                continue
            if kind != "train":
                continue
            header = UploadHeader(task["id"]).to_wire()  # HE: the count travels encrypted
            honest = self.scales(round_num)
            # Each twice: the second refused upload in a task leaves the site out of it.
            if round_num == 1:  # its count in plain, where HE carries it encrypted
                claim = {**header, "samples": 10**15}
                for _ in range(2):
                    log.append(self.refused(lambda: self.connection.upload(claim, honest)))  # noqa: B023
            elif round_num == 2:  # a valid payload with one value more than the round's
                longer = self.scales(round_num, extra=1)
                for _ in range(2):
                    log.append(self.refused(lambda: self.connection.upload(header, longer)))  # noqa: B023
            elif round_num == 3:  # an envelope declaring 10 GB, and 1 GiB sent after it
                for _ in range(2):
                    log.append(self.huge(header, honest, 10 << 30))
            elif round_num == 4:  # two uploads that send their header and then stall
                stalled = self.stalled_streams(2, header)
                for future in stalled:
                    log.append(str(future.exception(timeout=60)))
            peak[0] = max(peak[0], _rss_mb(server_pid))

    def claim(self, task: int | None, round_num: int) -> None:
        """Say this site applied ``round_num`` (it did not) so it is asked again."""
        report = Report(task, round_num, wire.Seconds(), 0, 0.0, (), None)
        self.connection.call("Report", report.to_wire())


def _run(
    project: Path, job: Path, work: Path, port: int, attack: bool
) -> tuple[str, list[str], float]:
    server = _server(project, job, work / "server", port)
    sites = [_site(project, name, work) for name in ("site-1", "site-2")]
    log: list[str] = []
    peak = [0.0]
    try:
        if attack:
            _wait_for(lambda: _reachable(project / "site-3", port), what="the server")
            attacker = Attacker(project / "site-3", port, work / "site-3")
            try:
                attacker.play(server.pid, project / "admin", log, peak)
            finally:
                attacker.stop.set()
        out = _job_done(server, sites)
    finally:
        _kill_all(server, *sites)
    return out, log, peak[0]


@pytest.mark.slow
def test_a_hostile_site_is_refused_and_the_job_ends_as_without_it(tmp_path: Path) -> None:
    project, port = _project(tmp_path, 3)
    job, _ = _job(tmp_path, rounds=4, min_clients=2, round_timeout=60.0)
    out, log, peak = _run(project, job, tmp_path / "attacked", port, attack=True)
    # Every attack was refused to the attacker, with its reason, and logged by its name.
    assert log[0] == "status answered during the flood: True"
    assert log[1] == "48 busy, 2 cut", log  # two held a slot each until the stall cut them
    assert all("malformed" in line for line in log[2:7]), log
    assert log[7:11] == ["bad-samples"] * 2 + ["wrong-length"] * 2, log
    assert "wrong-size" in log[11] and "wrong-size" in log[12], log
    assert any("busy" in line for line in log[13:]), log
    assert any("CANCELLED" in line for line in log[13:]), log
    # (The flood's two cut streams above are the stall watchdog's work; round 4's stalled
    # upload is cut by it too, or ends with the job when the honest sites finish first.)
    for reason in ("busy", "malformed", "bad-samples", "wrong-length"):
        assert f"refused site-3: {reason}" in out, reason
    assert "refused site-1" not in out and "refused site-2" not in out
    assert peak < RSS_LIMIT_MB, f"the server grew to {peak:.0f} MB"
    results = json.loads((tmp_path / "attacked" / "server" / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [2, 2, 2, 2]
    # Refused twice in a task, the attacker is not waited for: no round ran into its timeout.
    assert all(r["round_seconds"] < 60 for r in results["rounds"]), results["rounds"]
    # The same job without the attacker: the same model, bit for bit.
    _run(project, job, tmp_path / "alone", port, attack=False)
    alone = torch.load(tmp_path / "alone" / "site-1" / "model.pt")
    attacked = torch.load(tmp_path / "attacked" / "site-1" / "model.pt")
    for key, value in alone.items():
        assert torch.equal(attacked[key], value), key
