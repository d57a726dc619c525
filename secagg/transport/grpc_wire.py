"""The gRPC service between a secagg server and its clients: methods, framing, TLS.

No protobuf: every method carries bytes. Small messages are JSON; payloads travel as a stream
of chunks (``CHUNK`` bytes each) after a JSON header, so a payload of any size streams without
meeting gRPC's message-size limit, and the server can check its envelope header on the first
chunk and refuse the rest. Both ends authenticate with mutual TLS against the project's CA
(``secagg.provision``); the server knows a client by its certificate's common name.

Methods of ``secagg.Aggregator``:

=========  ==============  =============================================================
Join       unary           a site asks for the job; later says it is ready (its model's shape)
Ping       unary           heartbeat while a site trains (the server drops silent ones)
Task       unary           long poll: the next thing to do (train, seal, correct, apply, done, ...)
Upload     stream -> unary a JSON header, then a payload (scales, update or correction) in chunks
Download   unary -> stream an aggregate of a round, in chunks
Report     unary           what a site measured applying an aggregate, and its evaluation
Fail       unary           a site stops taking part, and says why (its task failed)
Status     unary           (admin) job, round, connected sites, last metrics
Abort      unary           (admin) stop the job
=========  ==============  =============================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from secagg.crypto.masking import (
    ADVERT_BYTES,
    PUBLIC_BYTES,
    SIGNATURE_BYTES,
    Advert,
    SignedKey,
)
from secagg.crypto.shares import SHARE_BYTES
from secagg.errors import PayloadError
from secagg.messages import EvalReply, ModelSignature, Seconds, metrics

SERVICE = "secagg.Aggregator"
METHODS = ("Join", "Ping", "Task", "Upload", "Download", "Report", "Fail", "Status", "Abort")
CHUNK = 1 << 20
#: Bounds on a relayed mask key's parts: an ECDSA P-256 signature (DER) and a PEM certificate.
MAX_SIGNATURE = 80
MAX_CERTIFICATE = 8192
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


# --- typed messages: what a site sends, checked at the door ------------------------------------


@dataclass(frozen=True)
class MaskKey:
    """A site's signed mask key for the job (``masking``) and its site certificate (PEM),
    which every peer checks against the project's CA before it checks the signature."""

    site: int
    public: bytes
    signature: bytes
    certificate: bytes

    def signed(self) -> SignedKey:
        return SignedKey(self.site, self.public, self.signature)

    def to_wire(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "public": self.public.hex(),
            "signature": self.signature.hex(),
            "certificate": self.certificate.decode("ascii"),
        }

    @classmethod
    def from_wire(cls, value: object) -> MaskKey:
        if not isinstance(value, Mapping):
            raise PayloadError("a mask key must be a mapping", "malformed")
        certificate = value.get("certificate")
        if not isinstance(certificate, str) or not 0 < len(certificate) <= MAX_CERTIFICATE:
            raise PayloadError("a mask key's certificate must be a PEM text", "malformed")
        return cls(
            whole(value, "site"),
            _hex(value, "public", PUBLIC_BYTES, PUBLIC_BYTES),
            _hex(value, "signature", 8, MAX_SIGNATURE),
            certificate.encode("ascii", errors="replace"),
        )


def advert_to_wire(advert: Advert) -> dict[str, Any]:
    """How a train task relays one position's attempt keys."""
    return {
        "site": advert.site,
        "publics": advert.publics.hex(),
        "signature": advert.signature.hex(),
    }


def advert_from(data: bytes, site: int) -> Advert:
    """A site's attempt keys as its advertise upload carries them (public keys, signature)."""
    if len(data) != ADVERT_BYTES + SIGNATURE_BYTES:
        raise PayloadError(
            f"attempt keys must be {ADVERT_BYTES + SIGNATURE_BYTES} bytes", "malformed"
        )
    return Advert(site, data[:ADVERT_BYTES], data[ADVERT_BYTES:])


def relayed_adverts(value: object, roster: int) -> list[Advert | None]:
    """A train task's attempt keys, one per position of the round (None: none there)."""
    if not isinstance(value, list) or len(value) != roster:
        raise PayloadError(f"a masked round relays {roster} attempt keys, by position", "bad-plan")
    adverts: list[Advert | None] = []
    for entry in value:
        if entry is None:
            adverts.append(None)
            continue
        if not isinstance(entry, Mapping):
            raise PayloadError("relayed attempt keys must be a mapping", "bad-plan")
        adverts.append(
            Advert(
                whole(entry, "site"),
                _hex(entry, "publics", ADVERT_BYTES, ADVERT_BYTES),
                _hex(entry, "signature", SIGNATURE_BYTES, SIGNATURE_BYTES),
            )
        )
    return adverts


def relayed_keys(value: object, roster: int) -> list[MaskKey | None]:
    """A train task's mask keys, one per position of the round (None: no key there)."""
    if not isinstance(value, list) or len(value) != roster:
        raise PayloadError(f"a masked round relays {roster} mask keys, by position", "bad-plan")
    return [None if entry is None else MaskKey.from_wire(entry) for entry in value]


@dataclass(frozen=True)
class Hello:
    """A site's Join: the last round it applied, and once it is ready to take part, its
    model's signature and parameter count (without them it only asks for the job), and when
    the job masks, its signed mask key."""

    applied: int = 0
    parameters: int = 0
    model: ModelSignature | None = None
    mask: MaskKey | None = None

    def to_wire(self) -> dict[str, Any]:
        model = self.model.to_wire() if self.model is not None else None
        message = {"applied": self.applied, "parameters": self.parameters, "model": model}
        return message if self.mask is None else {**message, "mask": self.mask.to_wire()}

    @classmethod
    def from_wire(cls, message: Mapping[str, Any]) -> Hello:
        model, mask = message.get("model"), message.get("mask")
        return cls(
            whole(message, "applied", default=0),
            whole(message, "parameters", default=0),
            ModelSignature.from_wire(model) if model is not None else None,
            MaskKey.from_wire(mask) if mask is not None else None,
        )


@dataclass(frozen=True)
class UploadHeader:
    """The first message of an upload: the task it answers, and for a training upload the
    sample count (the FedAvg weight) and the task's training metrics."""

    task: int
    samples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    seconds: Seconds = field(default_factory=Seconds)
    #: a ``confirm`` upload: the site's signature of the survivor set it was shown
    confirmation: bytes = b""
    #: a ``correct`` upload: the site's self-mask key for the phase
    revealed: bytes = b""
    #: a ``correct`` upload: its shares of the other survivors' self-mask keys, by survivor
    held: Mapping[int, bytes] = field(default_factory=dict)
    #: an ``advertise`` upload: the site's attempt keys and their signature, its shares
    #: sealed to each position, and its commitment to its self-mask keys
    sealed: Mapping[int, bytes] = field(default_factory=dict)
    commitment: bytes = b""
    #: a ``train`` upload without a payload: the site sits this attempt of the round out
    #: (it sent its update in an earlier one), so the server need not wait for it
    sitting_out: bool = False
    advert: bytes = b""
    #: a ``correct`` upload: its shares of the mask keys of the positions that sent nothing
    lost: Mapping[int, bytes] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "task": self.task,
            "samples": self.samples,
            "metrics": dict(self.metrics),
            "seconds": self.seconds.to_dict(),
        }
        if self.confirmation:
            message["confirmation"] = self.confirmation.hex()
        if self.revealed:
            message["revealed"] = self.revealed.hex()
        if self.advert:
            message["advert"] = self.advert.hex()
        for name in ("held", "sealed", "lost"):
            values = getattr(self, name)
            if values:
                message[name] = {str(p): blob.hex() for p, blob in values.items()}
        if self.commitment:
            message["commitment"] = self.commitment.hex()
        if self.sitting_out:
            message["sitting_out"] = True
        return message

    @classmethod
    def from_wire(cls, message: Mapping[str, Any]) -> UploadHeader:
        return cls(
            whole(message, "task"),
            whole(message, "samples", default=0),
            metrics(message.get("metrics")),
            Seconds.from_wire(message.get("seconds")),
            _hex(message, "confirmation", 1, 256) if "confirmation" in message else b"",
            _hex(message, "revealed", 32, 32) if "revealed" in message else b"",
            by_position(message.get("held"), "held", SHARE_BYTES, SHARE_BYTES),
            by_position(message.get("sealed"), "sealed", 1, 512),
            _hex(message, "commitment", 96, 96) if "commitment" in message else b"",
            message.get("sitting_out") is True,
            _advert(message),
            by_position(message.get("lost"), "lost", SHARE_BYTES, SHARE_BYTES),
        )


@dataclass(frozen=True)
class Report:
    """What a site says after applying a round's aggregate: what the aggregate held, what it
    cost, and its task's evaluation of the new global model (None without test data)."""

    task: int | None
    applied: int
    seconds: Seconds
    clipped: int
    weight: float
    contributors: tuple[int, ...]
    evaluation: EvalReply | None

    def to_wire(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "task": self.task,
            "applied": self.applied,
            "seconds": self.seconds.to_dict(),
            "clipped": self.clipped,
            "weight": self.weight,
            "contributors": list(self.contributors),
        }
        if self.evaluation is not None:
            message["eval"] = self.evaluation.to_wire()
        return message

    @classmethod
    def from_wire(cls, index: int, message: Mapping[str, Any]) -> Report:
        task = message.get("task")
        contributors = message.get("contributors", [])
        if not isinstance(contributors, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1 << 16
            for c in contributors
        ):
            raise PayloadError("report.contributors must be a list of site indexes", "malformed")
        weight = message.get("weight", 0.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise PayloadError("report.weight must be a number", "malformed")
        evaluation = message.get("eval")
        return cls(
            None if task is None else whole(message, "task"),
            whole(message, "applied"),
            Seconds.from_wire(message.get("seconds")),
            whole(message, "clipped", default=0),
            float(weight),
            tuple(contributors),
            None if evaluation is None else EvalReply.from_wire(index, evaluation),
        )


@dataclass(frozen=True)
class TaskRequest:
    """A site's long poll: the last task id it saw, and how long it will wait (seconds)."""

    after: int = 0
    wait: float = 10.0

    def to_wire(self) -> dict[str, Any]:
        return {"after": self.after, "wait": self.wait}

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], most: float) -> TaskRequest:
        wait = message.get("wait", cls.wait)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= most:
            raise PayloadError(f"'wait' must be a number of seconds in [0, {most}]", "malformed")
        return cls(whole(message, "after", default=0), float(wait))


@dataclass(frozen=True)
class DownloadRequest:
    """Which aggregate a site asks for: a round's summed ``update`` or ``scales``."""

    round: int
    what: str

    def to_wire(self) -> dict[str, Any]:
        return {"round": self.round, "what": self.what}

    @classmethod
    def from_wire(cls, message: Mapping[str, Any]) -> DownloadRequest:
        what = message.get("what")
        if what not in ("update", "scales", "attempt", "evaluation"):
            raise PayloadError(
                f"'what' must be 'update', 'scales', 'attempt' or 'evaluation', not {what!r}",
                "malformed",
            )
        return cls(whole(message, "round"), str(what))


def _advert(message: Mapping[str, Any]) -> bytes:
    if "advert" not in message:
        return b""
    size = ADVERT_BYTES + SIGNATURE_BYTES
    return _hex(message, "advert", size, size)


def by_position(value: object, key: str, least: int, most: int) -> dict[int, bytes]:
    """A peer's ``{position: hex}`` table (absent: empty), or a named refusal."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or len(value) > 1 << 16:
        raise PayloadError(f"'{key}' must be a table of positions", "malformed")
    table = {}
    for position, blob in value.items():
        if not isinstance(position, str) or not position.isdigit() or len(position) > 6:
            raise PayloadError(f"'{key}' must be keyed by positions", "malformed")
        table[int(position)] = _hex({key: blob}, key, least, most)
    return table


def _hex(message: Mapping[str, Any], key: str, least: int, most: int) -> bytes:
    """Bytes a peer sent as hex, of ``least`` to ``most`` bytes, or a named refusal."""
    value = message.get(key)
    try:
        data = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        data = None
    if data is None or not least <= len(data) <= most:
        raise PayloadError(f"'{key}' must be {least}-{most} bytes in hex", "malformed")
    return data


def whole(message: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """A non-negative whole number from a peer's message, or a named refusal."""
    value = message.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise PayloadError(f"'{key}' must be a whole number >= 0, not {value!r}", "malformed")
    return value
