"""What the round loop and the clients tell each other, besides payloads.

Plain values, no torch and no crypto library: the network server imports them too. Anything
that comes from a network peer is read through ``from_wire`` functions that check every field,
so a missing or mistyped field is a named refusal, never a ``KeyError`` inside a handler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from secagg.errors import PayloadError

#: A task may report at most this many named metrics per round.
MAX_METRICS = 64
#: The name an evaluation's loss has among its metrics in an encrypted report (no task's
#: metric can have it: names are printable).
EVAL_LOSS = "\0loss"


Signature = list[tuple[str, tuple[int, ...], str]]


@dataclass(frozen=True)
class ModelSignature:
    """What every party's initial model must share: the names, shapes and dtypes of its state
    (``flatten.describe``), and a digest of its initial weights."""

    layout: Signature
    digest: str

    def mismatch(self, other: ModelSignature) -> str | None:
        """How ``other`` differs from this (the job's) signature, in words; None if it does not."""
        difference = first_difference(self.layout, other.layout)
        if difference is not None:
            return difference
        if other.digest != self.digest:
            return (
                "its initial weights differ (same names and shapes): build_model must depend "
                "only on torch's seed, or name an initial_model file in the job"
            )
        return None

    def sizes(self) -> list[int]:
        """How many values each of the model's tensors holds, in order."""
        return [math.prod(shape) for _, shape, _ in self.layout]

    def to_wire(self) -> dict[str, Any]:
        return {"layout": [list(entry) for entry in self.layout], "digest": self.digest}

    @classmethod
    def from_wire(cls, value: object) -> ModelSignature:
        items = _mapping(value, "model")
        layout, digest = items.get("layout"), items.get("digest")
        if not isinstance(layout, list) or not isinstance(digest, str) or len(layout) > 1 << 20:
            raise PayloadError("model must hold a layout list and a digest", "malformed")
        entries = []
        for entry in layout:
            if (
                not isinstance(entry, list)
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or not isinstance(entry[1], list)
                or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31
                    for d in entry[1]
                )
                or not isinstance(entry[2], str)
            ):
                raise PayloadError("model layout entries must be [name, shape, dtype]", "malformed")
            entries.append((entry[0], tuple(entry[1]), entry[2]))
        return cls(entries, digest)


def first_difference(
    expected: list[tuple[str, tuple[int, ...], str]],
    actual: list[tuple[str, tuple[int, ...], str]],
) -> str | None:
    """The first way ``actual`` differs from ``expected`` (both from ``describe``), in words;
    None when they are the same."""
    for index, (want, got) in enumerate(zip(expected, actual, strict=False)):
        (name, shape, dtype), (other, other_shape, other_dtype) = want, got
        if other != name:
            return f"entry {index} is {other!r}, the job's model has {name!r} there"
        if tuple(other_shape) != tuple(shape):
            return f"{name!r} has shape {list(other_shape)}, the job's model has {list(shape)}"
        if other_dtype != dtype:
            return f"{name!r} is {other_dtype}, the job's model has {dtype}"
    if len(actual) != len(expected):
        extra = actual[len(expected) :] or expected[len(actual) :]
        which = "has" if len(actual) > len(expected) else "lacks"
        return f"it {which} {extra[0][0]!r} ({abs(len(actual) - len(expected))} entries differ)"
    return None


@dataclass(frozen=True)
class Seconds:
    """Where a client spent a round's time. ``prepare`` is the scale exchange (encrypting how
    large its update is); ``encrypt`` includes reading the agreed steps."""

    train: float = 0.0
    flatten: float = 0.0
    prepare: float = 0.0
    encrypt: float = 0.0
    decrypt: float = 0.0
    unflatten: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {key: value for key, value in asdict(self).items() if value}

    @classmethod
    def from_wire(cls, value: object) -> Seconds:
        """Seconds reported by a site: unknown keys are ignored, bad values refused."""
        if value is None:
            return cls()
        items = _mapping(value, "seconds")
        known = {f.name for f in fields(cls)}
        return cls(**{k: _number(v, f"seconds.{k}", 0.0) for k, v in items.items() if k in known})


@dataclass(frozen=True)
class TrainReply:
    """A client after training: its sample count (the FedAvg weight) and what its task
    measured (both 0 and empty for an integer codec, which encrypts them with the scales),
    and, for an integer codec, its encrypted part of the scale exchange."""

    client_id: int
    num_samples: int
    scales: bytes | None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: Seconds = field(default_factory=Seconds)


@dataclass
class FitReply:
    """One client's encrypted update for a round, and what sealing it cost."""

    client_id: int
    payload: bytes
    seconds: Seconds = field(default_factory=Seconds)
    size: int = 0
    #: an integer codec: the round's training metrics as this client decrypted them from
    #: the summed scales (every site's average, never one site's values)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ApplyReply:
    """What a client measured applying an aggregate, and what the aggregate said."""

    client_id: int
    seconds: Seconds
    clipped: int
    weight: float
    contributors: tuple[int, ...]


@dataclass(frozen=True)
class EvalReply:
    """The global model on one client's test data (its task's ``EvalResult``)."""

    client_id: int
    loss: float
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    #: an integer codec: the evaluation encrypted (``crypto.report``; the fields above are
    #: then NaN, 0 and empty: the server reads none of them)
    payload: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        return {"loss": self.loss, "samples": self.num_samples, "metrics": self.metrics}

    @classmethod
    def from_wire(cls, client_id: int, value: object) -> EvalReply:
        items = _mapping(value, "eval")
        samples = items.get("samples")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise PayloadError("eval.samples must be a positive whole number", "malformed")
        return cls(
            client_id,
            _number(items.get("loss"), "eval.loss"),
            samples,
            metrics(items.get("metrics"), "eval.metrics"),
        )


def metrics(value: object, what: str = "metrics") -> dict[str, float]:
    """A task's named metrics, checked: names are short strings, values finite numbers."""
    if value is None:
        return {}
    items = _mapping(value, what)
    if len(items) > MAX_METRICS:
        raise PayloadError(f"{what} has {len(items)} entries, at most {MAX_METRICS}", "malformed")
    out = {}
    for name, number in items.items():
        printable = isinstance(name, str) and (name.isprintable() or name == EVAL_LOSS)
        if not printable or not 0 < len(name) <= 64:
            # EVAL_LOSS: the evaluation's loss, as the sites report it back
            raise PayloadError(
                f"{what} names must be printable strings of 1-64 characters", "malformed"
            )
        out[name] = _number(number, f"{what}.{name}")
    return out


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PayloadError(f"{what} must be a mapping, not {type(value).__name__}", "malformed")
    return value


def _number(value: object, what: str, minimum: float | None = None) -> float:
    """A number from a peer. With ``minimum`` it must be finite and at least that (times,
    counts); a task's loss and metrics may be NaN or infinite (an undefined AUC, a diverged
    loss), which is reported as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{what} must be a number, not {type(value).__name__}", "malformed")
    number = float(value)
    if minimum is not None and not (math.isfinite(number) and number >= minimum):
        raise PayloadError(f"{what} is {number}, out of range", "malformed")
    return number
