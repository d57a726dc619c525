"""The gRPC service between a secagg server and its clients: methods, framing, TLS.

No protobuf: every method carries bytes. Small messages are JSON; payloads travel as a stream
of chunks (``CHUNK`` bytes each) after a JSON header, so a payload of any size streams without
meeting gRPC's message-size limit, and the server can check its envelope header on the first
chunk and refuse the rest. Both ends authenticate with mutual TLS against the project's CA
(``secagg.provision``); the server knows a client by its certificate's common name.

Methods of ``secagg.Aggregator``:

=========  ==============  =============================================================
Join       unary           a site announces itself and its sample count; gets the job
Ping       unary           heartbeat while a site trains (the server drops silent ones)
Task       unary           long poll: the next thing to do (train, seal, apply, done, ...)
Upload     stream -> unary a JSON header, then a payload in chunks
Download   unary -> stream an aggregate of a round, in chunks
Report     unary           what a site measured applying an aggregate, and its evaluation
Status     unary           (admin) job, round, connected sites, last metrics
Abort      unary           (admin) stop the job
=========  ==============  =============================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

SERVICE = "secagg.Aggregator"
METHODS = ("Join", "Ping", "Task", "Upload", "Download", "Report", "Status", "Abort")
CHUNK = 1 << 20
#: gRPC message limits: chunks and JSON messages stay far below this.
MESSAGE_LIMIT = 8 * CHUNK
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    value = json.loads(data.decode())
    if not isinstance(value, dict):
        raise ValueError("message is not a JSON object")
    return value


def chunks(payload: bytes | memoryview) -> Iterator[bytes]:
    """A payload as gRPC messages of at most CHUNK bytes."""
    view = memoryview(payload).cast("B")
    for start in range(0, len(view), CHUNK):
        yield bytes(view[start : start + CHUNK])


def upload_messages(header: dict[str, Any], payload: bytes) -> Iterable[bytes]:
    """The stream of one upload: the JSON header, then the payload's chunks."""
    yield encode(header)
    yield from chunks(payload)
