"""The server's side of the network transport: a gRPC service over mutual TLS, and the
Transport the round loop drives. The round code is the same as in-process (``secagg.rounds``).

RPC handlers run in gRPC's thread pool and meet the round loop in ``Coordinator``:

- an upload is refused as soon as its envelope header shows it is for another job, round,
  phase or sender (the sender must be the site its certificate names), or when the site already
  delivered for this task: stale, replayed and duplicate contributions never reach the sum;
- the whole payload is then checked like the sum would (``ServerCipher.check``) before it is
  queued, so the sum sees only payloads it will accept, and the site hears why it was refused;
- fewer than ``min_clients`` deliveries fail the round (``RoundFailed``), and the round loop
  starts it again;
- when the sites mask (``masking``), the train task relays every site's signed mask key and
  certificate, by position, with a fresh attempt nonce; a phase that lost a site asks its
  contributors for corrections (a ``correct`` task), and refuses the lost site's late upload.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from secagg.crypto import MaskRoster, Reveal, Stamp, contributors, envelope, ledger, masking
from secagg.errors import PayloadError, SecAggError
from secagg.messages import ApplyReply, EvalReply, FitReply, TrainReply
from secagg.provision import Kit
from secagg.rounds import RoundFailed
from secagg.server import RunningAttempt, finish_running, running_attempt, save_running
from secagg.transport import grpc_wire as wire
from secagg.transport.coordinator import POLL_SECONDS, Coordinator, Site, Task, Upload
from secagg.transport.limits import Busy, SiteLimits, Watchdog, pool_size


class Service:
    """The gRPC methods. Each handler names its peer from the TLS certificate first, holds
    one of that site's call slots (``limits``), and reads the message into a typed one; any
    bad message is refused to that site with a named reason and logged by its name, and
    never reaches the round loop."""

    def __init__(
        self, coordinator: Coordinator, max_payload: int, stall: float, deadline: float
    ) -> None:
        self.c = coordinator
        self.max_payload = max_payload
        #: an upload that sends nothing for this long is cut, and its site left out
        self.stall = stall
        #: an upload still running after this long is cut (the round's phase timeout)
        self.deadline = deadline
        self.limits = SiteLimits()

    def handlers(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        methods = {
            "Join": unary(self.join),
            "Ping": unary(self.ping),
            "Task": unary(self.task),
            "Upload": grpc.stream_unary_rpc_method_handler(self.upload),
            "Download": grpc.unary_stream_rpc_method_handler(self.download),
            "Report": unary(self.report),
            "Fail": unary(self.fail),
            "Status": unary(self.status),
            "Abort": unary(self.abort),
        }
        return grpc.method_handlers_generic_handler(wire.SERVICE, methods)

    @contextmanager
    def _door(self, context: grpc.ServicerContext, kind: str = "call") -> Iterator[Site]:
        """The calling site, holding one of its ``kind`` slots while the handler runs; a
        PayloadError in the handler is refused to the site by name."""
        site = self.c.identify(context)
        assert site is not None
        try:
            with self.limits.hold(site.name, kind):
                yield site
        except Busy as err:
            self.c.refused(site, PayloadError(str(err), "busy"))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"busy: {err}")
        except PayloadError as err:
            self.c.refused(site, err)
            context.abort(_code(err), f"{err.reason}: {err}")

    def join(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._door(context) as site:
            return wire.encode(self.c.join(site, wire.Hello.from_wire(_message(request))))
        raise AssertionError("unreachable: the door aborts")  # pragma: no cover

    def ping(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._door(context):
            return wire.encode({"ok": True})
        raise AssertionError("unreachable: the door aborts")  # pragma: no cover

    def task(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._door(context) as site:
            asked = wire.TaskRequest.from_wire(_message(request), POLL_SECONDS)
            return wire.encode(self.c.next_task(site, asked.after, asked.wait))
        raise AssertionError("unreachable: the door aborts")  # pragma: no cover

    def upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        with self._door(context, "stream") as site:
            watchdog = Watchdog(context, self.stall, self.deadline)
            task = None
            try:
                header = wire.UploadHeader.from_wire(_message(_first(requests)))
                watchdog.progress()
                if header.sitting_out:
                    self.c.sit_out(site, header.task)
                    return wire.encode({"ok": True})
                task, stamp, values = self.c.check_upload(site, header)
                kind = _KINDS[task.kind]
                with self.limits.hold(site.name, "body"):
                    with watchdog.paused():  # waiting for a turn is not stalling
                        self.c.uploads.acquire()
                    try:
                        size = self._size(task, stamp, values)
                        payload = self._receive(requests, stamp, values, size, kind, watchdog)
                    finally:
                        self.c.uploads.release()
                if values and kind == envelope.UPDATE:
                    self.c.cipher.check(payload, stamp, values)
                self.c.deliver(task, Upload(task.id, site.index, payload, header))
            except grpc.RpcError as err:
                # The watchdog cut the stream, or the site hung up: nothing to answer.
                why = watchdog.cut or "hung up"
                if task is not None:
                    self.c.drop(site, task, at_once=True)
                raise PayloadError(f"upload stream {why}", "stalled") from err
            except (PayloadError, Busy):
                if task is not None:
                    self.c.drop(site, task)  # the round goes on without it
                raise
            finally:
                watchdog.stop()
            return wire.encode({"ok": True})
        raise AssertionError("unreachable: the door aborts")  # pragma: no cover

    def _size(self, task: Task, stamp: Stamp, values: int) -> int:
        """The exact byte length of the upload ``task`` asks for: an update's (0: a header
        alone)."""
        return self.c.cipher.size(values, stamp) if values else 0

    def _receive(
        self,
        requests: Iterator[bytes],
        stamp: Stamp,
        values: int,
        size: int,
        kind: int,
        watchdog: Watchdog,
    ) -> bytes:
        """The payload's chunks, refused at the first one whose envelope header is wrong or
        declares any other size than ``size``; never more than that size is held."""
        if size > self.max_payload:
            raise PayloadError(
                f"the round's payloads are {size} bytes, over this server's limit of "
                f"{self.max_payload}",
                "oversize",
            )
        data = bytearray()
        checked = False
        for chunk in requests:
            watchdog.progress()
            if not checked and values:
                head = bytes(data) + chunk[: envelope.HEADER_SIZE]
                if len(head) >= envelope.HEADER_SIZE:
                    self._check_header(head, stamp, values, size, kind)
                    checked = True
            if len(data) + len(chunk) > size:
                raise PayloadError(
                    f"payload is longer than the round's {size} bytes", "wrong-length"
                )
            data += chunk
        return bytes(data)

    def _check_header(self, head: bytes, stamp: Stamp, values: int, size: int, kind: int) -> None:
        """Refuse a payload whose fixed header is wrong for the round, on its first bytes."""
        declared = envelope.declared_size(head)
        codec = self.c.cipher.codec_for_round(stamp)
        opened = envelope.read_header(head, codec, stamp, kind)
        ledger.check_length(opened.values, values)
        if declared != size:
            raise PayloadError(
                f"payload declares {declared} bytes, a payload of this round is {size}",
                "wrong-size",
            )

    def download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._door(context):
            asked = wire.DownloadRequest.from_wire(_message(request))
            payload = self.c.download(asked.round, asked.what)
            yield from wire.chunks(payload)

    def report(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._door(context) as site:
            self.c.report(site, wire.Report.from_wire(site.index, _message(request)))
            return wire.encode({"ok": True})
        raise AssertionError("unreachable: the door aborts")  # pragma: no cover

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._door(context) as site:
            error = _message(request).get("error")
            self.c.fail(site, str(error)[:2000] if error else "stopped without saying why")
            return wire.encode({"ok": True})
        raise AssertionError("unreachable: the door aborts")  # pragma: no cover

    def status(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.c.identify(context, admin=True)
        return wire.encode(self.c.status())

    def abort(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.c.identify(context, admin=True)
        try:
            reason = str(_message(request).get("reason") or "no reason given")
        except PayloadError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err.reason}: {err}")
        self.c.abort(f"aborted by the administrator: {reason[:2000]}")
        return wire.encode({"ok": True})


#: How unmasking tasks name each phase.
_PHASES = {
    envelope.SCALES: "scales",
    envelope.UPDATE_PHASE: "update",
    envelope.EVALUATION: "evaluation",
}

#: What an upload for each kind of task carries.
#: A header alone: an advert, a signature, a reveal or the averages a site read; no payload.
_HEADER = 0
_KINDS = {
    "advertise": _HEADER,
    "train": envelope.UPDATE,
    "seal": envelope.UPDATE,
    "confirm": _HEADER,
    "correct": _HEADER,
    "evaluate": envelope.UPDATE,
    "average": _HEADER,
}


def _digest(scales: bytes | None) -> str | None:
    """How a task names the round's summed scales (a site's copy must be these)."""
    return None if scales is None else hashlib.sha256(scales).hexdigest()


def _code(err: PayloadError) -> grpc.StatusCode:
    """The status a refusal travels with: the site's client names it back (``_guard``)."""
    if err.reason in ("model-mismatch", "no-mask-key"):
        return grpc.StatusCode.FAILED_PRECONDITION
    if err.reason == "duplicate":
        return grpc.StatusCode.ALREADY_EXISTS
    if err.reason == "busy":  # the site tries again, as when the server is not up yet
        return grpc.StatusCode.UNAVAILABLE
    if err.reason == "not-found":
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.INVALID_ARGUMENT


def _first(requests: Iterator[bytes]) -> bytes:
    try:
        return next(requests)
    except StopIteration as err:
        raise PayloadError("upload stream ended before its header", "malformed") from err


def _message(request: bytes) -> dict[str, Any]:
    try:
        return wire.decode(request)
    except (ValueError, UnicodeDecodeError) as err:
        raise PayloadError(f"malformed message: {err}", "malformed") from err


def start(service: Service, kit: Kit, bind: str) -> tuple[grpc.Server, int]:
    """A gRPC server for ``service`` on ``bind`` (host:port) with mutual TLS; returns it and
    its port. Clients without a certificate of the project's CA are refused in the handshake.
    Its thread pool holds every site at its caps and the admin API's own threads."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=pool_size(len(kit.roster))),
        options=wire.CHANNEL_OPTIONS,
    )
    server.add_generic_rpc_handlers((service.handlers(),))
    credentials = grpc.ssl_server_credentials(
        [(kit.private_key, kit.certificate)], root_certificates=kit.ca, require_client_auth=True
    )
    port = server.add_secure_port(bind, credentials)
    if port == 0:
        raise SecAggError(f"cannot listen on {bind}: the port is taken or the address is wrong")
    server.start()
    return server, port


class GrpcTransport:
    """The Transport the round loop drives when the clients are remote sites."""

    def __init__(
        self, coordinator: Coordinator, min_clients: int, timeout: float, grace: float = 5.0
    ) -> None:
        self.c = coordinator
        self.roster = len(coordinator.sites)
        self.min_clients = min_clients
        self.timeout = timeout
        self.grace = grace
        self._trained: frozenset[int] = frozenset()
        self._evals: list[EvalReply] = []
        self._applied: frozenset[int] = frozenset()
        #: the round's sites that sent their update: the ones that evaluate its model (HE)
        self._contributed: frozenset[int] = frozenset()
        #: the current attempt as its sites advertised it (None: no masks), and the round's
        #: tasks by phase (``correct`` closes them)
        self._masks: MaskRoster | None = None
        self._phases: dict[int, Task] = {}
        #: the attempt a stopped server was running, which this round's first try resumes
        self._resumed: RunningAttempt | None = None

    def tensor_sizes(self) -> list[int]:
        return self.c.tensor_sizes()

    def attempt(self, round_num: int, tries: int) -> bytes:
        """A fresh nonce, except for the first try of a round this server was running when it
        stopped: that attempt resumes, with the same sites (``train``)."""
        self._resumed = None
        if tries == 0:
            self._resumed = running_attempt(self.c.workdir, self.c.job, round_num)
        return os.urandom(16) if self._resumed is None else self._resumed.nonce

    def train(self, round_stamp: Stamp) -> list[TrainReply]:
        round_num = round_stamp.round_num
        resumed = self._resumed if self.c.masking else None
        if resumed is not None and resumed.nonce == round_stamp.attempt:
            # Its sites may have sent their update under it, and send it under no other: only
            # the same sites and keys can finish the round.
            names = ", ".join(self.c.sites[i].name for i in sorted(resumed.sites))
            self.c.log(f"round {round_num}: resuming the attempt it was running ({names})")
            sites = self.c.wait_for_sites(
                round_num, self.min_clients, self.grace, self.timeout, exactly=resumed.sites
            )
        else:
            sites = self.c.wait_for_sites(round_num, self.min_clients, self.grace, self.timeout)
        masks: dict[str, Any] = {}
        self._masks = None
        if self.c.masking:
            # The attempt's nonce (a round tried again masks afresh), recorded before any site
            # hears of it; every site's signed job key, relayed by position with the advertise
            # task; then every advert, and each site's sealed shares, with the train task.
            nonce = round_stamp.attempt or os.urandom(16)
            save_running(self.c.workdir, self.c.job, round_num, RunningAttempt(nonce, sites))
            self._masks = self._advertised(round_stamp, sites, nonce)
            sites = self._masks.keyed
            masks = {
                "adverts": [
                    None if a is None else wire.advert_to_wire(a) for a in self._masks.adverts
                ],
                "nonce": nonce.hex(),
                # Each site is handed only the shares sealed to it (``Coordinator.next_task``).
                "shares": {
                    str(p): {str(s): blob.hex() for s, blob in self._masks.sealed_to(p).items()}
                    for p in sites
                },
            }
        task = self.c.post(
            "train", round_stamp.round_num, sites, job=round_stamp.job.hex(), **masks
        )
        self._phases = {envelope.SCALES: task}
        replies = []
        for upload in self.c.collect(task, self.timeout):
            header = upload.meta
            replies.append(
                TrainReply(
                    upload.index,
                    header.samples,
                    upload.payload or None,
                    dict(header.metrics),
                    header.seconds,
                )
            )
        self._require({r.client_id for r in replies}, round_stamp.round_num, "trained")
        self._trained = frozenset(r.client_id for r in replies)
        return replies

    def _advertised(self, round_stamp: Stamp, sites: frozenset[int], nonce: bytes) -> MaskRoster:
        """The attempt's keys, as ``sites`` advertise them; a site whose keys do not verify
        against its certificate is left out of the round by name (relayed, they would stop
        every honest site), and so is one that sends none in time."""
        round_num = round_stamp.round_num
        keys = self.c.mask_keys(sites)
        task = self.c.post(
            "advertise",
            round_num,
            sites,
            job=round_stamp.job.hex(),
            keys=keys,
            nonce=nonce.hex(),
        )
        advertised: dict[int, masking.Advertised] = {}
        for upload in self.c.collect(task, self.timeout):
            header, site = upload.meta, self.c.sites[upload.index]
            try:
                advert = wire.advert_from(header.advert, upload.index)
                masking.check_advert(
                    round_stamp.job, round_num, nonce, advert, self.c.site_key(upload.index)
                )
            except PayloadError as err:
                self.c.log(
                    f"round {round_num}: {site.name}'s attempt keys are refused, and the site "
                    f"is left out of the round: {err}"
                )
                continue
            advertised[upload.index] = masking.Advertised(
                advert, dict(header.sealed), header.commitment
            )
        self._require(set(advertised), round_num, "advertised their keys")
        signed = [None if key is None else wire.MaskKey.from_wire(key).signed() for key in keys]
        return MaskRoster.of(
            round_stamp.job,
            nonce,
            signed,
            [advertised.get(p) for p in range(self.roster)],
            self.c.kit.policy(),
        )

    def seal(
        self, round_stamp: Stamp, total_samples: int, scales: bytes | None
    ) -> Iterator[FitReply]:
        if scales is not None:
            self.c.publish(round_stamp.round_num, "scales", scales)
        task = self.c.post(
            "seal",
            round_stamp.round_num,
            self._trained,
            total_samples=total_samples,
            scales=_digest(scales),
        )
        self._phases[round_stamp.phase] = task
        sealed = set()
        for upload in self.c.collect(task, self.timeout):
            sealed.add(upload.index)
            meta = upload.meta
            yield FitReply(
                upload.index, upload.payload, meta.seconds, len(upload.payload), dict(meta.metrics)
            )
        self._require(sealed, round_stamp.round_num, "sent their update")
        self._contributed = frozenset(sealed)

    def masks(self, round_num: int) -> MaskRoster | None:
        return self._masks

    def unmask(self, stamp: Stamp, survivors: tuple[int, ...]) -> list[Reveal]:
        """Close the phase to the advertised sites that sent nothing (a late upload of theirs
        is refused from here on); ask ``survivors`` to confirm the set (``confirm``), relay
        their signatures with a ``correct`` task, and return the reveals that came in time
        (a lost survivor's key is rebuilt from the others' shares)."""
        keyed = self._masks.keyed if self._masks is not None else frozenset()
        dropped = tuple(sorted(keyed - set(survivors)))
        self.c.close(self._phases[stamp.phase], dropped)
        phase = _PHASES[stamp.phase]
        sites = frozenset(survivors)
        task = self.c.post(
            "confirm", stamp.round_num, sites, phase=phase, survivors=list(survivors)
        )
        signed = {u.index: u.meta.confirmation for u in self.c.collect(task, self.timeout)}
        task = self.c.post(
            "correct",
            stamp.round_num,
            sites,
            phase=phase,
            survivors=list(survivors),
            confirmations={str(p): s.hex() for p, s in signed.items()},
        )
        reveals = {
            u.index: Reveal(
                u.index,
                u.meta.revealed,
                signed.get(u.index, b""),
                dict(u.meta.held),
                dict(u.meta.lost),
            )
            for u in self.c.collect(task, self.timeout)
        }
        missing = [self.c.sites[p].name for p in survivors if p not in reveals]
        if missing:
            self.c.log(
                f"round {stamp.round_num}: {', '.join(missing)} sent no mask reveal in time; "
                f"their keys for the {phase} are rebuilt from the others' shares"
            )
        if dropped:
            names = ", ".join(self.c.sites[p].name for p in dropped)
            self.c.log(
                f"round {stamp.round_num}: the {phase} lost {names}; their mask keys are "
                "rebuilt from the survivors' shares"
            )
        return [reveals[p] for p in survivors if p in reveals]

    def apply(self, round_stamp: Stamp, payload: bytes, scales: bytes | None) -> list[ApplyReply]:
        round_num = round_stamp.round_num
        self.c.publish(round_num, "update", payload)
        with self.c.lock:
            self.c.completed = round_num
        sites = frozenset(self.c.ready_sites(round_num))
        self.c.publish(round_num, "attempt", round_stamp.attempt)
        finish_running(self.c.workdir, round_num)  # checkpointed: the attempt is over
        task = self.c.post(
            "apply", round_num, sites, scales=_digest(scales), attempt=round_stamp.attempt.hex()
        )
        reports = self.c.collect_reports(task, self.timeout)
        self._evals = [r.evaluation for r in reports.values() if r.evaluation is not None]
        self._applied = frozenset(reports) & self._contributed
        return [
            ApplyReply(i, r.seconds, r.clipped, r.weight, r.contributors)
            for i, r in reports.items()
        ]

    def evaluators(self, round_num: int) -> int:
        return self.roster

    def evaluate(self, stamp: Stamp) -> list[EvalReply]:
        """Plaintext: the evaluations the sites reported with their apply. HE: the sites that
        sent the round's update and applied it encrypt theirs for an evaluate task (each
        uploads one, zeros when it has no test data)."""
        if not self.c.cipher.quantizes:
            return self._evals
        # No attempt in the task: each site evaluates under the attempt it trained in.
        task = self.c.post("evaluate", stamp.round_num, self._applied)
        self._phases[stamp.phase] = task
        uploads = list(self.c.collect(task, self.timeout))
        if len(uploads) < self.min_clients:
            # The sites would refuse to unmask a sum below the round policy's threshold.
            self.c.log(
                f"round {stamp.round_num}: only {len(uploads)} site(s) evaluated, at least "
                f"{self.min_clients} are needed; the round's metrics are unknown"
            )
            return []
        return [EvalReply(u.index, math.nan, 0, {}, u.payload) for u in uploads]

    def averages(self, stamp: Stamp, payload: bytes) -> list[dict[str, float]]:
        """The sites that applied the round decrypt the summed evaluations; each uploads what
        the metrics average to (nothing when it cannot name them: it had no test data)."""
        self.c.publish(stamp.round_num, "evaluation", payload)
        summed = frozenset(contributors(payload))  # a late evaluator's is not in it
        task = self.c.post("average", stamp.round_num, summed)
        views = [dict(u.meta.metrics) for u in self.c.collect(task, self.timeout)]
        return [view for view in views if view]

    def _require(self, delivered: set[int], round_num: int, what: str) -> None:
        if len(delivered) < self.min_clients:
            raise RoundFailed(
                f"round {round_num}: only {len(delivered)} site(s) {what} in time, "
                f"at least {self.min_clients} are needed"
            )
