"""Transports carry bytes between the round loop and the clients.

The round loop only sees this interface, so an in-process simulation and a networked
deployment run the same round code. ``fit`` yields replies as clients finish, so the server can
add each payload as it arrives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from secagg.client import EvalReply, FitReply


class Transport(Protocol):
    def fit(self, round_num: int) -> Iterator[FitReply]:
        """Ask every client to train; yield each reply as it arrives."""
        ...

    def apply(self, round_num: int, payload: bytes) -> list[dict[str, float]]:
        """Send the summed payload to every client to decrypt and load; return their timings."""
        ...

    def evaluate(self, round_num: int) -> list[EvalReply]:
        """Ask the evaluating clients for the global model's test loss and accuracy."""
        ...
