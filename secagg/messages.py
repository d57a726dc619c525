"""What the round loop and the clients tell each other, besides payloads.

Plain values, no torch and no crypto library: the network server imports them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from secagg.crypto import Stamp


@dataclass(frozen=True)
class RoundPlan:
    """What every client is told at the start of a round.

    ``round`` names the job, the round and the roster size (its sender is the server's);
    ``total_samples`` is N, the samples of all clients asked to train, so that the weights
    ``n_i / N`` add up to at most 1 (what the packed codec's headroom relies on).
    """

    round: Stamp
    total_samples: int


@dataclass
class FitReply:
    """What one client sends for a round, and what it measured on the way."""

    client_id: int
    payload: bytes
    num_samples: int
    train_loss: float
    seconds: dict[str, float] = field(default_factory=dict)
    size: int = 0


@dataclass(frozen=True)
class ApplyReply:
    """What a client measured applying an aggregate, and what the aggregate said."""

    client_id: int
    seconds: dict[str, float]
    clipped: int
    weight: float
    contributors: tuple[int, ...]


@dataclass(frozen=True)
class EvalReply:
    client_id: int
    loss: float
    accuracy: float
    num_samples: int
