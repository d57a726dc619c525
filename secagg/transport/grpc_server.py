"""The server's side of the network transport: a gRPC service over mutual TLS, and the
Transport the round loop drives. The round code is the same as in-process (``secagg.rounds``).

RPC handlers run in gRPC's thread pool and meet the round loop in ``Coordinator``:

- an upload is refused as soon as its envelope header shows it is for another job, round,
  phase or sender (the sender must be the site its certificate names), or when the site already
  delivered for this task: stale, replayed and duplicate contributions never reach the sum;
- the whole payload is then checked like the sum would (``ServerCipher.check``) before it is
  queued, so the sum sees only payloads it will accept, and the site hears why it was refused;
- fewer than ``min_clients`` deliveries fail the round (``RoundFailed``), and the round loop
  starts it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from secagg.crypto import Stamp, envelope
from secagg.errors import PayloadError, SecAggError
from secagg.messages import ApplyReply, EvalReply, FitReply, TrainReply
from secagg.provision import Kit
from secagg.rounds import RoundFailed
from secagg.transport import grpc_wire as wire
from secagg.transport.coordinator import POLL_SECONDS, Coordinator, Upload


class Service:
    """The gRPC methods; each handler names its peer from the TLS certificate first."""

    def __init__(self, coordinator: Coordinator, max_payload: int) -> None:
        self.c = coordinator
        self.max_payload = max_payload

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

    def join(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site = self.c.identify(context)
        assert site is not None
        try:
            return wire.encode(self.c.join(site, wire.Hello.from_wire(_message(request, context))))
        except PayloadError as err:
            self.c.refused(site, err)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{err.reason}: {err}")
            raise

    def ping(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.c.identify(context)
        return wire.encode({"ok": True})

    def task(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site = self.c.identify(context)
        assert site is not None
        message = _message(request, context)
        after, wait = int(message.get("after", 0)), float(message.get("wait", POLL_SECONDS))
        return wire.encode(self.c.next_task(site, after, wait))

    def upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        site = self.c.identify(context)
        assert site is not None
        try:
            header = wire.UploadHeader.from_wire(wire.decode(next(requests)))
            task, stamp = self.c.check_upload(site, header.task)
            if task.kind == "train" and header.samples < 1:
                raise PayloadError("a training upload must report its sample count", "malformed")
            with self.c.uploads:
                payload = self._receive(requests, stamp)
            # Training ends in a scale payload, except for a codec without scale exchange.
            if payload or task.kind == "seal" or self.c.cipher.quantizes:
                self.c.cipher.check(payload, stamp)
            self.c.deliver(task, Upload(task.id, site.index, payload, header))
        except PayloadError as err:
            self.c.refused(site, err)
            code = grpc.StatusCode.ALREADY_EXISTS if err.reason == "duplicate" else None
            context.abort(code or grpc.StatusCode.INVALID_ARGUMENT, f"{err.reason}: {err}")
        except (StopIteration, ValueError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed upload: {err}")
        return wire.encode({"ok": True})

    def _receive(self, requests: Iterator[bytes], stamp: Stamp) -> bytes:
        """The payload's chunks, refused at the first one whose envelope header is wrong."""
        data = bytearray()
        expected = None
        for chunk in requests:
            data += chunk
            if expected is None and len(data) >= envelope.HEADER_SIZE:
                envelope.read_header(memoryview(data), self.c.cipher.codec, stamp, envelope.UPDATE)
                expected = envelope.declared_size(data)
                if expected > self.max_payload:
                    raise PayloadError(
                        f"payload declares {expected} bytes, over this server's limit of "
                        f"{self.max_payload}",
                        "oversize",
                    )
            if expected is not None and len(data) > expected:
                raise PayloadError("payload is longer than its header declares", "malformed")
        return bytes(data)

    def download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.c.identify(context)
        message = _message(request, context)
        try:
            payload = self.c.download(int(message["round"]), str(message["what"]))
        except (PayloadError, KeyError, ValueError) as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        yield from wire.chunks(payload)

    def report(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site = self.c.identify(context)
        assert site is not None
        try:
            self.c.report(site, wire.Report.from_wire(site.index, _message(request, context)))
        except PayloadError as err:
            self.c.refused(site, err)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err.reason}: {err}")
        return wire.encode({"ok": True})

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site = self.c.identify(context)
        assert site is not None
        error = _message(request, context).get("error")
        self.c.fail(site, str(error)[:2000] if error else "stopped without saying why")
        return wire.encode({"ok": True})

    def status(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.c.identify(context, admin=True)
        return wire.encode(self.c.status())

    def abort(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.c.identify(context, admin=True)
        reason = str(_message(request, context).get("reason") or "aborted by the administrator")
        self.c.abort(reason)
        return wire.encode({"ok": True})


def _message(request: bytes, context: grpc.ServicerContext) -> dict[str, Any]:
    try:
        return wire.decode(request)
    except ValueError as err:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}")
        raise


def start(service: Service, kit: Kit, bind: str) -> tuple[grpc.Server, int]:
    """A gRPC server for ``service`` on ``bind`` (host:port) with mutual TLS; returns it and
    its port. Clients without a certificate of the project's CA are refused in the handshake."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2 * len(kit.roster) + 8),
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

    def train(self, round_stamp: Stamp) -> list[TrainReply]:
        sites = self.c.wait_for_sites(
            round_stamp.round_num, self.min_clients, self.grace, self.timeout
        )
        task = self.c.post("train", round_stamp.round_num, sites, job=round_stamp.job.hex())
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

    def seal(
        self, round_stamp: Stamp, total_samples: int, scales: bytes | None
    ) -> Iterator[FitReply]:
        if scales is not None:
            self.c.publish(round_stamp.round_num, "scales", scales)
        task = self.c.post(
            "seal", round_stamp.round_num, self._trained, total_samples=total_samples
        )
        sealed = set()
        for upload in self.c.collect(task, self.timeout):
            sealed.add(upload.index)
            yield FitReply(upload.index, upload.payload, upload.meta.seconds, len(upload.payload))
        self._require(sealed, round_stamp.round_num, "sent their update")

    def apply(self, round_stamp: Stamp, payload: bytes, scales: bytes | None) -> list[ApplyReply]:
        round_num = round_stamp.round_num
        self.c.publish(round_num, "update", payload)
        with self.c.lock:
            self.c.completed = round_num
        sites = frozenset(self.c.ready_sites(round_num))
        task = self.c.post("apply", round_num, sites)
        reports = self.c.collect_reports(task, self.timeout)
        self._evals = [r.evaluation for r in reports.values() if r.evaluation is not None]
        return [
            ApplyReply(i, r.seconds, r.clipped, r.weight, r.contributors)
            for i, r in reports.items()
        ]

    def evaluate(self, round_num: int) -> list[EvalReply]:
        return self._evals

    def _require(self, delivered: set[int], round_num: int, what: str) -> None:
        if len(delivered) < self.min_clients:
            raise RoundFailed(
                f"round {round_num}: only {len(delivered)} site(s) {what} in time, "
                f"at least {self.min_clients} are needed"
            )
