"""secagg's round messages in Flower records, both ways, each field checked on the way in.

A step of secagg's protocol travels in a Flower ``Message`` whose content holds one
``ConfigRecord`` under ``"secagg"`` (``STEP``): the step's name and its fields, bytes as bytes.
Flower's records hold no nested mappings, so a mapping by position travels as two lists. What a
node or the server receives is read through the functions here, so a missing or mistyped field
is a named ``PayloadError``, never a ``KeyError`` in a handler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from secagg.crypto import Reveal
from secagg.crypto.masking import Advert, Advertised, SignedKey
from secagg.errors import PayloadError
from secagg.messages import ApplyReply, EvalReply, FitReply, Seconds, TrainReply

#: The record of a message that carries a secagg step.
STEP = "secagg"
#: The job settings a server sends a node when it joins: the job's shape, never its
#: protection (masks and the threshold are the node's own).
JOB_FIELDS = (
    "clients",
    "clients_per_round",
    "rounds",
    "seed",
    "max_client_samples",
    "he_precision",
)


def request(step: str, fields: Mapping[str, Any], **records: Any) -> RecordDict:
    """A message's content for ``step`` (other records, such as the user's ``config``, beside
    it)."""
    return RecordDict({STEP: ConfigRecord({"step": step, **fields}), **records})


def step_of(message: Message) -> ConfigRecord | None:
    """The secagg step a message carries (None: a plain Flower message)."""
    if not message.has_content() or STEP not in message.content:
        return None
    record = message.content[STEP]
    return record if isinstance(record, ConfigRecord) else None


def field(record: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``record[name]``, refused by name unless it is of ``kind``."""
    value = record.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise PayloadError(f"secagg's {name!r} field is missing or mistyped", "malformed")
    return value


def by_position(mapping: Mapping[int, bytes], name: str) -> dict[str, list[Any]]:
    """A mapping position -> bytes as the lists ``<name>_at`` and ``<name>``."""
    return {f"{name}_at": list(mapping), name: list(mapping.values())}


def positions(record: Mapping[str, Any], name: str) -> dict[int, bytes]:
    """Inverse of ``by_position``."""
    at, values = record.get(f"{name}_at", []), record.get(name, [])
    if (
        not isinstance(at, list)
        or not isinstance(values, list)
        or len(at) != len(values)
        or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in at)
        or not all(isinstance(v, bytes) for v in values)
    ):
        raise PayloadError(f"secagg's {name!r} lists are malformed", "malformed")
    return dict(zip(at, values, strict=True))


def keys_fields(keys: Sequence[SignedKey | None]) -> dict[str, list[Any]]:
    """The round's signed job keys by position (site -1: a position with none)."""
    return _signed_fields(
        "key", [None if k is None else (k.site, k.public, k.signature) for k in keys]
    )


def keys_from(record: Mapping[str, Any]) -> list[SignedKey | None]:
    return [None if e is None else SignedKey(*e) for e in _signed_from(record, "key")]


def _signed_fields(
    prefix: str, entries: Sequence[tuple[int, bytes, bytes] | None]
) -> dict[str, list[Any]]:
    """Signed keys by position, as three lists (site -1: a position with none)."""
    return {
        f"{prefix}_sites": [-1 if e is None else e[0] for e in entries],
        f"{prefix}_publics": [b"" if e is None else e[1] for e in entries],
        f"{prefix}_signatures": [b"" if e is None else e[2] for e in entries],
    }


def _signed_from(record: Mapping[str, Any], prefix: str) -> list[tuple[int, bytes, bytes] | None]:
    """Inverse of ``_signed_fields``, or a named refusal."""
    sites, publics = record.get(f"{prefix}_sites", []), record.get(f"{prefix}_publics", [])
    signatures = record.get(f"{prefix}_signatures", [])
    if not (
        isinstance(sites, list)
        and isinstance(publics, list)
        and isinstance(signatures, list)
        and len(sites) == len(publics) == len(signatures)
        and all(isinstance(s, int) and not isinstance(s, bool) for s in sites)
        and all(isinstance(b, bytes) for b in publics + signatures)
    ):
        raise PayloadError(f"secagg's relayed {prefix}s are malformed", "malformed")
    return [
        None if site < 0 else (site, public, signature)
        for site, public, signature in zip(sites, publics, signatures, strict=True)
    ]


def key_fields(key: SignedKey) -> dict[str, Any]:
    return {"site": key.site, "public": key.public, "signature": key.signature}


def key_from(record: Mapping[str, Any]) -> SignedKey:
    return SignedKey(
        field(record, "site", int),
        field(record, "public", bytes),
        field(record, "signature", bytes),
    )


def metrics_from(record: Mapping[str, Any], name: str = "metrics") -> dict[str, float]:
    names, values = record.get(f"{name}_names", []), record.get(f"{name}_values", [])
    if (
        not isinstance(names, list)
        or not isinstance(values, list)
        or len(names) != len(values)
        or not all(isinstance(n, str) for n in names)
        or not all(isinstance(v, float) for v in values)
    ):
        raise PayloadError(f"secagg's {name!r} are malformed", "malformed")
    return dict(zip(names, values, strict=True))


def metrics_fields(metrics: Mapping[str, float], name: str = "metrics") -> dict[str, list[Any]]:
    return {f"{name}_names": list(metrics), f"{name}_values": [float(v) for v in metrics.values()]}


def advertised_fields(advertised: Advertised) -> dict[str, Any]:
    return {
        "site": advertised.advert.site,
        "publics": advertised.advert.publics,
        "signature": advertised.advert.signature,
        "commitment": advertised.commitment,
        **by_position(advertised.sealed, "sealed"),
    }


def advertised_from(position: int, record: Mapping[str, Any]) -> Advertised:
    advert = Advert(
        field(record, "site", int),
        field(record, "publics", bytes),
        field(record, "signature", bytes),
    )
    return Advertised(advert, positions(record, "sealed"), field(record, "commitment", bytes))


def adverts_fields(adverts: Sequence[Advert | None]) -> dict[str, list[Any]]:
    """An attempt's keys by position (site -1: a position that advertised none)."""
    entries = [None if a is None else (a.site, a.publics, a.signature) for a in adverts]
    return _signed_fields("advert", entries)


def adverts_from(record: Mapping[str, Any]) -> list[Advert | None]:
    return [None if e is None else Advert(*e) for e in _signed_from(record, "advert")]


def train_fields(reply: TrainReply) -> dict[str, Any]:
    return {
        "samples": reply.num_samples,
        "scales": reply.scales or b"",
        **metrics_fields(reply.metrics),
    }


def train_from(position: int, record: Mapping[str, Any]) -> TrainReply:
    scales = field(record, "scales", bytes)
    return TrainReply(
        position, field(record, "samples", int), scales or None, metrics_from(record), Seconds()
    )


def fit_fields(reply: FitReply) -> dict[str, Any]:
    return {"payload": reply.payload, **metrics_fields(reply.metrics)}


def fit_from(position: int, record: Mapping[str, Any]) -> FitReply:
    payload = field(record, "payload", bytes)
    return FitReply(position, payload, Seconds(), len(payload), metrics_from(record))


def reveal_fields(reveal: Reveal) -> dict[str, Any]:
    return {
        "key": reveal.key,
        "confirmation": reveal.confirmation,
        **by_position(reveal.shares, "shares"),
        **by_position(reveal.lost, "lost"),
    }


def reveal_from(position: int, record: Mapping[str, Any]) -> Reveal:
    return Reveal(
        position,
        field(record, "key", bytes),
        field(record, "confirmation", bytes),
        positions(record, "shares"),
        positions(record, "lost"),
    )


def apply_fields(reply: ApplyReply) -> dict[str, Any]:
    return {
        "clipped": reply.clipped,
        "weight": reply.weight,
        "contributors": list(reply.contributors),
    }


def apply_from(position: int, record: Mapping[str, Any]) -> ApplyReply:
    contributors = field(record, "contributors", list)
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in contributors):
        raise PayloadError("secagg's 'contributors' are malformed", "malformed")
    return ApplyReply(
        position,
        Seconds(),
        field(record, "clipped", int),
        field(record, "weight", float),
        tuple(contributors),
    )


def eval_fields(reply: EvalReply | None) -> dict[str, Any]:
    if reply is None:
        return {"evaluated": False}
    return {
        "evaluated": True,
        "loss": reply.loss,
        "samples": reply.num_samples,
        "payload": reply.payload,
        **metrics_fields(reply.metrics),
    }


def eval_from(position: int, record: Mapping[str, Any]) -> EvalReply | None:
    if not field(record, "evaluated", bool):
        return None
    return EvalReply(
        position,
        field(record, "loss", float),
        field(record, "samples", int),
        metrics_from(record),
        field(record, "payload", bytes),
    )
