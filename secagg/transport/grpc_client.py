"""A site's side of the network transport: connect, join, and do what the server asks.

The site holds the same ``secagg.client.Client`` an in-process run uses, with the secret
context from its kit; the server never sees anything but its payloads. The loop:

- connect over mutual TLS and join, retrying with backoff while the server is not up;
- catch up: apply the aggregates of every round completed before it joined (a late or
  rejoining site), fetched from the server's checkpoint chain;
- then, per task: ``train`` (check the peers' relayed mask keys, train, upload the encrypted
  scales), ``seal`` (download the summed scales, upload the encrypted update), ``correct``
  (when a phase lost a site: upload this site's mask corrections), ``apply`` (download the
  aggregate, decrypt, apply, evaluate, report), until ``done`` or ``abort``.

A relayed mask key that fails its checks (a certificate the project's CA did not sign for that
site, or a signature that does not verify) stops the site with an error naming the peer: the
server, or the network, substituted it.

A heartbeat thread pings the server while the site trains, so a slow site is not taken for a
dead one. If the connection breaks mid-round, the site drops that round's work, reconnects and
joins again. After every round it keeps the decrypted global model (``model.pt``) and what it
measured (``metrics.json``) in its work folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from secagg.client import Client
from secagg.crypto import SERVER, Stamp
from secagg.crypto.certified import CertifiedIdentities
from secagg.crypto.masking import Advert, SignedKey
from secagg.errors import ConfigError, PayloadError, SecAggError, TaskError
from secagg.files import atomic_write_json
from secagg.messages import EVAL_LOSS
from secagg.provision import Kit
from secagg.transport import grpc_wire as wire

HEARTBEAT_SECONDS = 2.0
#: Statuses after which a site joins again (with backoff) rather than stop.
TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,  # what a dying server's calls end with, or a cut upload
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # this site is over its call caps for a moment
)


class ServerGone(SecAggError):
    """The server could not be reached (it is down, or the network is)."""


@dataclass
class Joined:
    """What the server told a site when it joined."""

    job: bytes
    index: int
    roster: int
    config: dict[str, Any]
    completed: int
    fingerprint: str


class Connection:
    """One mutual-TLS channel to the server, with a method per RPC (bytes in, bytes out)."""

    def __init__(self, kit: Kit, target: str | None = None) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=kit.ca, private_key=kit.private_key, certificate_chain=kit.certificate
        )
        self.target = target or kit.server
        self.channel = grpc.secure_channel(self.target, credentials, options=wire.CHANNEL_OPTIONS)

    def call(self, method: str, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        rpc = self.channel.unary_unary(wire.path(method))
        return wire.decode(_guard(lambda: rpc(wire.encode(message), timeout=timeout)))

    def upload(self, header: dict[str, Any], payload: bytes) -> None:
        rpc = self.channel.stream_unary(wire.path("Upload"))
        _guard(lambda: rpc(iter(wire.upload_messages(header, payload)), timeout=3600))

    def download(self, round_num: int, what: str) -> bytes:
        rpc = self.channel.unary_stream(wire.path("Download"))
        request = wire.encode({"round": round_num, "what": what})
        return _guard(lambda: b"".join(rpc(request, timeout=3600)))

    def close(self) -> None:
        self.channel.close()


def _guard(call: Callable[[], Any]) -> Any:
    """Run an RPC; turn gRPC's errors into secagg's."""
    try:
        return call()
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
        if code in TRANSIENT:
            raise ServerGone(f"server unreachable ({code.name.lower()}): {details}") from err
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            raise ConfigError(
                f"the server refused this site: {details.partition(': ')[2]}"
            ) from err
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
            reason, _, message = details.partition(": ")
            raise PayloadError(f"the server refused the payload: {message}", reason) from err
        raise SecAggError(f"the server answered {code.name}: {details}") from err


def join(
    connection: Connection, hello: wire.Hello, wait: float, log: Callable[[str], None]
) -> Joined:
    """Join the job, retrying with backoff (1 s doubling to 30 s) for up to ``wait`` seconds.

    A site first joins without its model, to learn the job; it takes part in rounds once it
    has joined again with its model's signature, which the server checks against the job's.
    """
    deadline = time.monotonic() + wait
    delay = 1.0
    while True:
        try:
            reply = connection.call("Join", hello.to_wire(), timeout=20)
            return Joined(
                bytes.fromhex(reply["job"]),
                int(reply["index"]),
                len(reply["roster"]),
                reply["config"],
                int(reply["completed"]),
                str(reply["fingerprint"]),
            )
        except ServerGone as err:
            if time.monotonic() + delay > deadline:
                raise ServerGone(
                    f"no server at {connection.target} after {wait:.0f} s ({err}); start "
                    "'secagg server' there, or check the address in the kit"
                ) from err
            log(f"server not reachable yet; retrying in {delay:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


class Site:
    """Runs a Client against a server until the job is done."""

    def __init__(
        self,
        connection: Connection,
        client: Client,
        joined: Joined,
        workdir: Path,
        log: Callable[[str], None],
        identities: CertifiedIdentities | None = None,
        certificate: bytes = b"",
    ) -> None:
        self.connection = connection
        #: this site's key and its peers' checked certificates, when the job masks
        self.identities = identities
        #: this site's certificate (PEM), sent with its mask key
        self.certificate = certificate
        self.client = client
        self.joined = joined
        self.workdir = workdir
        self.log = log
        #: the last round whose aggregate this site applied
        self.applied = 0
        self.metrics: list[dict[str, Any]] = []
        self._scales: dict[int, bytes] = {}
        #: the attempt of the round this site last trained in (its train task's nonce)
        self._attempts: dict[int, bytes] = {}
        #: whether rounds have a scale exchange (HE: the packed codec)
        self.scaled = client.config.he
        #: what this site uploaded in its current attempt, by what each task asked: a server
        #: restarted mid-round resumes the attempt and asks again, and gets the same bytes
        #: (never a second masked payload, ``crypto.masking``)
        self._sent: dict[tuple[object, ...], tuple[wire.UploadHeader, bytes]] = {}

    def mask_key(self) -> wire.MaskKey | None:
        """This site's signed mask key for the job, with its certificate (None: no masks)."""
        signed = self.client.mask_key(self.joined.job)
        if signed is None:
            return None
        return wire.MaskKey(signed.site, signed.public, signed.signature, self.certificate)

    def round_stamp(self, round_num: int, attempt: bytes | None = None) -> Stamp:
        """A round's stamp, with ``attempt`` (default: the one this site took part in last,
        from its train task; never a later task's claim)."""
        if attempt is None:
            attempt = self._attempts.get(round_num, b"")
        return Stamp(self.joined.job, round_num, SERVER, self.joined.roster, attempt=attempt)

    def run(self) -> str:
        """Do tasks until the job ends; return how it ended (``done`` or the abort reason)."""
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True)
        beat.start()
        after = 0
        try:
            while True:
                task = self.connection.call("Task", {"after": after, "wait": 10.0}, timeout=30)
                kind = task["kind"]
                if kind == "done":
                    return "done"
                if kind == "abort":
                    return str(task.get("reason", "aborted"))
                if kind == "catchup":
                    self.catch_up(int(task["completed"]))
                    continue
                if kind == "wait":
                    continue
                if kind == "rejoin":  # the server restarted, and knows this site no more
                    raise ServerGone("the server restarted and asks this site to join again")
                if kind not in _KINDS:
                    raise SecAggError(
                        f"the server asked for '{kind}', which this secagg does not know; run "
                        "the same secagg release on the server and every site"
                    )
                after = int(task["id"])
                try:
                    getattr(self, f"do_{kind}")(task)
                except TaskError as err:
                    tell_failed(self.connection, str(err))
                    raise
                except PayloadError as err:
                    if (
                        kind == "apply"
                        or err.reason in _STOPS
                        or isinstance(err, _AggregateRefused)
                    ):
                        # An aggregate that fails its checks (the update's, or the scales'
                        # while sealing), a substituted mask key, or a server that breaks the
                        # round policy or shows sites different survivor sets must stop this
                        # site; the server hears why. A site that went on would tell a server
                        # trying aggregates on it, one bit a time, which ones decrypt.
                        decrypted = kind == "apply" or isinstance(err, _AggregateRefused)
                        tell_failed(self.connection, _told(err, task) if decrypted else str(err))
                        raise
                    self.log(
                        f"round {task['round']}: the server refused this site's payload: {err}"
                    )
        finally:
            # Let a heartbeat in flight finish: a gRPC call cut off by the interpreter's exit
            # can abort the process.
            stop.set()
            beat.join(timeout=15)

    def catch_up(self, completed: int) -> None:
        """Apply every round this site missed, in order, from the server's chain."""
        while self.applied < completed:
            round_num = self.applied + 1
            self.log(f"catching up: applying round {round_num} of {completed}")
            self._apply(round_num, task_id=None)

    def _send(self, asked: tuple[object, ...], header: wire.UploadHeader, payload: bytes) -> None:
        """Upload an answer to a task of this site's current attempt, kept (before it leaves:
        a server that stops mid-upload asks again) for a resumed attempt's same question."""
        attempt = asked[1:3]  # (round, nonce)
        self._sent = {k: v for k, v in self._sent.items() if k[1:3] == attempt}
        self._sent[asked] = (header, payload)
        self.connection.upload(header.to_wire(), payload)

    def _resend(self, asked: tuple[object, ...], task: dict[str, Any]) -> bool:
        """Answer a task this site already answered in the same attempt (a restarted server
        resuming it) with the same bytes; False when it did not."""
        sent = self._sent.get(asked)
        if sent is None:
            return False
        header, payload = sent
        self.log(f"round {task['round']}: sending the {task['kind']} answer it sent before")
        self.connection.upload(replace(header, task=int(task["id"])).to_wire(), payload)
        return True

    def do_advertise(self, task: dict[str, Any]) -> None:
        """An attempt starts: send this site's signed keys for it and its shares of them,
        sealed to the round's positions (the same bytes again if a restarted server asks
        again)."""
        round_num = int(task["round"])
        nonce = _nonce(task.get("nonce", ""))
        stamp = self.round_stamp(round_num, nonce).for_sender(self.joined.index)
        peers = self._peers(task)
        if not peers:
            return
        self._attempts = {round_num: nonce}
        # The keys themselves (their signatures are drawn afresh each time a site joins).
        keys = tuple(None if peer is None else (peer.site, peer.public) for peer in peers)
        asked = ("advertise", round_num, nonce, keys)
        if self._resend(asked, task):
            return
        try:
            self._once("advertise", round_num, nonce)
            advertised = self.client.advertise(stamp, peers, nonce)
        except PayloadError as err:
            if err.reason != "sit-out":
                raise
            self._sit_out(task, err)
            return
        assert advertised is not None  # a site that masks advertises
        advert = advertised.advert
        header = wire.UploadHeader(
            int(task["id"]),
            sealed=advertised.sealed,
            commitment=advertised.commitment,
            advert=advert.publics + advert.signature,
        )
        self._send(asked, header, b"")

    def _once(self, kind: str, round_num: int, nonce: bytes) -> None:
        """Refuse (``sit-out``) a second, different ``kind`` task of one attempt: a resumed
        attempt asked with other keys gets nothing new, never a second set of masks."""
        if nonce and any(k[0] == kind and k[1:3] == (round_num, nonce) for k in self._sent):
            raise PayloadError(
                f"the server resumed round {round_num}'s attempt with other mask keys; this "
                "site masks nothing twice under one attempt, and sits it out",
                "sit-out",
            )

    def _sit_out(self, task: dict[str, Any], err: PayloadError) -> None:
        """Tell the server at once that this site sits the attempt out (so it need not wait)."""
        self.log(f"round {task['round']}: {err}")
        header = wire.UploadHeader(int(task["id"]), sitting_out=True)
        self.connection.upload(header.to_wire(), b"")

    def do_train(self, task: dict[str, Any]) -> None:
        round_num = int(task["round"])
        nonce = _nonce(task.get("nonce", ""))
        stamp = self.round_stamp(round_num, nonce).for_sender(self.joined.index)
        adverts: list[Advert | None] = []
        sealed: dict[int, bytes] = {}
        if self.identities is not None:
            adverts = wire.relayed_adverts(task.get("adverts"), self.joined.roster)
            sealed = wire.by_position(task.get("shares"), "shares", 1, 512)
        self._attempts = {round_num: nonce}
        relayed = tuple(None if a is None else (a.site, a.publics) for a in adverts)
        asked = ("train", round_num, nonce, relayed)
        if nonce and self._resend(asked, task):
            return
        try:
            self._once("train", round_num, nonce)
            self.log(f"round {round_num}: training")
            reply = self.client.train(stamp, adverts, sealed, nonce)
        except PayloadError as err:
            if err.reason != "sit-out":
                raise
            self._sit_out(task, err)
            return
        header = wire.UploadHeader(int(task["id"]), reply.num_samples, reply.metrics, reply.seconds)
        self._send(asked, header, reply.scales or b"")

    def _peers(self, task: dict[str, Any]) -> list[SignedKey | None] | None:
        """The round's relayed mask keys, each peer's certificate checked against the CA
        (``[]``: the job does not mask); None when the keys predate this site's own (it
        joined again after the round began): it sits the round out."""
        if self.identities is None:
            return []
        keys = wire.relayed_keys(task.get("keys"), self.joined.roster)
        own, mine = keys[self.joined.index], self.mask_key()
        if own is None or mine is None or own.public != mine.public:
            self.log(f"round {task['round']}: its mask keys predate this site's; sitting it out")
            return None
        for position, key in enumerate(keys):
            if key is None or position == self.joined.index:
                continue
            if key.site != position:
                raise PayloadError(
                    f"the mask key relayed at {self.identities.name(position)}'s position is "
                    f"{self.identities.name(key.site)}'s",
                    "bad-key",
                )
            self.identities.learn(key.site, key.certificate)
        return [None if key is None else key.signed() for key in keys]

    def do_confirm(self, task: dict[str, Any]) -> None:
        stamp, survivors = self._unmasking(task)
        signature = self.client.confirm(stamp, survivors)
        header = wire.UploadHeader(int(task["id"]), confirmation=signature)
        self.connection.upload(header.to_wire(), b"")

    def do_correct(self, task: dict[str, Any]) -> None:
        stamp, survivors = self._unmasking(task)
        relayed = task.get("confirmations")
        if not isinstance(relayed, dict) or len(relayed) > self.joined.roster:
            raise PayloadError("a correct task must relay the survivors' confirmations", "bad-plan")
        confirmations = {}
        for position, signature in relayed.items():
            try:
                confirmations[int(position)] = bytes.fromhex(str(signature))
            except ValueError as err:
                raise PayloadError("a relayed confirmation is not hex", "bad-plan") from err
        asked = ("correct", stamp.round_num, stamp.attempt, stamp.phase, survivors)
        if self._resend(asked, task):
            return
        reveal = self.client.reveal(stamp, survivors, confirmations)
        if reveal.lost:
            self.log(
                f"round {stamp.round_num}: revealing its shares of the mask keys of "
                f"{len(reveal.lost)} lost site(s)"
            )
        header = wire.UploadHeader(
            int(task["id"]), revealed=reveal.key, held=reveal.shares, lost=reveal.lost
        )
        self._send(asked, header, b"")

    def _unmasking(self, task: dict[str, Any]) -> tuple[Stamp, tuple[int, ...]]:
        """The phase's stamp (this site's position) and the survivor set a confirm or correct
        task names."""
        stamp = self.round_stamp(int(task["round"])).for_sender(self.joined.index)
        if task.get("phase") == "scales":
            stamp = stamp.scales()
        elif task.get("phase") == "evaluation":
            stamp = stamp.evaluation(self.joined.roster)
        survivors = task.get("survivors")
        if (
            not isinstance(survivors, list)
            or len(survivors) > self.joined.roster
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in survivors)
        ):
            raise PayloadError("an unmasking task must name the survivor set", "bad-plan")
        return stamp, tuple(survivors)

    def do_seal(self, task: dict[str, Any]) -> None:
        round_num = int(task["round"])
        scales = self._fetch_scales(round_num, task.get("scales"))
        stamp = self.round_stamp(round_num).for_sender(self.joined.index)
        total = int(task["total_samples"])
        held = None if scales is None else _digest(scales)
        asked = ("seal", round_num, stamp.attempt, total, held)
        if self._resend(asked, task):
            return
        try:
            reply = self.client.seal(stamp, total, scales)
        except PayloadError as err:
            if err.reason in ("bad-total", "bad-scales"):
                # A sum that passed its integrity tag, so a site's doing (a count it inflated,
                # a histogram no honest site sends): no oracle for a server, which cannot make
                # such a sum; decline the round, which is tried again, and stay.
                self.log(f"round {round_num}: declining the round: {err}")
                header = wire.UploadHeader(int(task["id"]), sitting_out=True)
                self.connection.upload(header.to_wire(), b"")
                return
            if err.reason == "bad-plan":
                raise
            raise _AggregateRefused(str(err), err.reason) from err  # the scales failed a check
        header = wire.UploadHeader(int(task["id"]), metrics=reply.metrics, seconds=reply.seconds)
        self.log(f"round {round_num}: sending {reply.size / 1e6:.1f} MB")
        self._send(asked, header, reply.payload)

    def do_apply(self, task: dict[str, Any]) -> None:
        attempt = _nonce(task.get("attempt", ""))
        self._apply(int(task["round"]), task["id"], task.get("scales"), attempt)

    def _apply(
        self,
        round_num: int,
        task_id: int | None,
        digest: object = None,
        attempt: bytes | None = None,
    ) -> None:
        """Apply a round's aggregate, checked under ``attempt``, the try of the round that
        made it (the server names it; every contribution's tags must agree, so an aggregate
        that mixes attempts is refused); a catching-up site asks the server for it."""
        update = self.connection.download(round_num, "update")
        scales = self._fetch_scales(round_num, digest)
        if attempt is None:
            attempt = _nonce(self.connection.download(round_num, "attempt").hex())
        applied = self.client.apply(update, self.round_stamp(round_num, attempt), scales)
        self.applied = round_num
        self._scales.pop(round_num, None)
        evaluation = None
        if not self.scaled:  # HE: the site evaluates for the round's evaluate task, encrypted
            try:
                evaluation = self.client.evaluate(self._evaluation_stamp(round_num, attempt))
            except TaskError as err:
                tell_failed(self.connection, str(err))
                raise
        report = wire.Report(
            task_id,
            round_num,
            applied.seconds,
            applied.clipped,
            applied.weight,
            applied.contributors,
            evaluation,
        )
        self.connection.call("Report", report.to_wire())
        self.metrics.append({"round": round_num, **report.to_wire()})
        self._save()
        if self.joined.index not in applied.contributors:
            self.log(f"round {round_num}: the aggregate does not hold this site's update")
        shown = "".join(
            f", {name} {value:.4f}"
            for name, value in (evaluation.metrics if evaluation else {}).items()
        )
        self.log(f"round {round_num}: applied the global model{shown}")

    def _evaluation_stamp(self, round_num: int, attempt: bytes) -> Stamp:
        """The round's evaluation phase, as the site at this position encrypts it."""
        stamp = self.round_stamp(round_num, attempt).evaluation(self.joined.roster)
        return stamp.for_sender(self.joined.index)

    def do_evaluate(self, task: dict[str, Any]) -> None:
        """Evaluate the global model just applied and upload it encrypted (zeros without test
        data: the sum still counts this site); the server reads nothing of it."""
        round_num = int(task["round"])
        if round_num not in self._attempts or self.applied != round_num:
            raise PayloadError(
                f"the server asks for an evaluation of round {round_num}, which is not the "
                "round this site trained in and applied last: it sends none",
                "bad-plan",
            )
        # Under the attempt this site trained in, never one the task names: its masks are
        # that attempt's (an evaluation it cannot mask is never sent, ``Client.evaluate``).
        stamp = self._evaluation_stamp(round_num, self._attempts[round_num])
        reply = self.client.evaluate(stamp)
        payload = b"" if reply is None else reply.payload
        self.connection.upload(wire.UploadHeader(int(task["id"])).to_wire(), payload)

    def do_average(self, task: dict[str, Any]) -> None:
        """Decrypt the round's summed evaluations and tell the server what they average to
        (nothing when this site did not evaluate and cannot name them). A sum that fails
        its checks stops this site, as an aggregate does (no decryption oracle)."""
        round_num = int(task["round"])
        stamp = self.round_stamp(round_num)  # the attempt this site trained in
        summed = self.connection.download(round_num, "evaluation")
        try:
            averages = self.client.averages(stamp.evaluation(self.joined.roster), summed)
        except PayloadError as err:
            if err.reason not in ("bad-samples", "bad-report", "policy"):
                raise _AggregateRefused(str(err), err.reason) from err
            # A sum of too few sites (refused before decrypting), or an honest one (it passed
            # every check) in which a site lied about its count: the round's metrics are
            # unknown, and the round stands.
            self.log(f"round {round_num}: the sites' evaluation is not reported: {err}")
            averages = None
        header = wire.UploadHeader(int(task["id"]), metrics=averages or {})
        self.connection.upload(header.to_wire(), b"")
        if averages:
            for row in reversed(self.metrics):  # the round's row, written when it applied
                if row.get("round") == round_num:
                    row["evaluation"] = _shown(averages)
                    break
            self._save()
            shown = "".join(f", {k} {v:.4f}" for k, v in _shown(averages).items())
            self.log(f"round {round_num}: the sites' evaluation{shown}")

    def _fetch_scales(self, round_num: int, digest: object = None) -> bytes | None:
        """The round's summed scales: the copy this site holds only when it is the one the
        task names (its SHA-256), else the server's. A round tried again with other members
        has other scales: a copy kept by round number alone would decode the new aggregate
        on the old steps, and fork this site's model without an error."""
        if not self.scaled:
            return None
        held = self._scales.get(round_num)
        if held is not None and isinstance(digest, str) and _digest(held) == digest:
            return held
        fresh = self.connection.download(round_num, "scales")
        if isinstance(digest, str) and _digest(fresh) != digest:
            raise PayloadError(
                f"the server's scales of round {round_num} are not the ones its task names",
                "bad-plan",
            )
        self._scales[round_num] = fresh
        return fresh

    def _save(self) -> None:
        self.client.save(self.workdir / "model.pt")
        atomic_write_json(self.workdir / "metrics.json", {"rounds": self.metrics})

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                self.connection.call("Ping", {}, timeout=5)
            except SecAggError:
                continue


#: The tasks a site does (``do_<kind>``).
_KINDS = ("advertise", "train", "seal", "confirm", "correct", "apply", "evaluate", "average")


def _shown(averages: dict[str, float]) -> dict[str, float]:
    """Averages as a person reads them: the loss by its name."""
    return {("loss" if k == EVAL_LOSS else k): v for k, v in averages.items()}


def tell_failed(connection: Connection, error: str) -> None:
    """Tell the server this site stops, and why, so it need not wait for it."""
    # If the server is gone too, this site's own error is what matters.
    with contextlib.suppress(SecAggError):
        connection.call("Fail", {"error": error}, timeout=10)


def _told(err: PayloadError, task: dict[str, Any]) -> str:
    """What the server hears of an aggregate this site refused: the reason code alone. The
    full message can hold numbers decrypted from the sum (a tally, a weight, round tags),
    which stay on the site."""
    return (
        f"refused round {task.get('round')}'s aggregate ({err.reason}); the details are in "
        "this site's own log"
    )


def check_keys(joined: Joined, fingerprint: bytes) -> None:
    if joined.fingerprint != fingerprint.hex():
        raise ConfigError(
            "this site's CKKS keys are not the server's (key fingerprints differ); use the "
            "kits of one 'secagg provision'"
        )


#: Refusals that stop this site: a substituted mask key, a round that breaks the round policy,
#: survivor sets that differ between sites (each is the server's lie, or the network's).
_STOPS = ("bad-key", "policy", "inconsistent")


def _nonce(value: object) -> bytes:
    """An attempt nonce a task names (hex), refused unless 0 to 64 bytes."""
    try:
        nonce = bytes.fromhex(str(value))
    except ValueError as err:
        raise PayloadError("a task's attempt nonce is not hex", "bad-plan") from err
    if len(nonce) > 64:
        raise PayloadError("a task's attempt nonce is over 64 bytes", "bad-plan")
    return nonce


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _AggregateRefused(PayloadError):
    """An aggregate this site decrypted failed its checks (not a refusal by the server)."""
