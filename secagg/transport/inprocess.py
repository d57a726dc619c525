"""In-process transport: clients are objects in this process, run one after another.

Payloads still cross as bytes, so bytes on the wire are measured exactly as a network run
would send them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from secagg.client import Client
from secagg.crypto import Stamp
from secagg.messages import ApplyReply, EvalReply, FitReply, TrainReply
from secagg.transport import Progress, no_progress


class InProcessTransport:
    """``on_progress`` hears each client finish each step (``("train", 3, 8)``)."""

    def __init__(self, clients: Sequence[Client], on_progress: Progress = no_progress) -> None:
        self.clients = list(clients)
        self.roster = len(self.clients)
        self.on_progress = on_progress

    def _each(self, phase: str) -> Iterator[tuple[int, Client]]:
        """The clients in turn; after each one's step, say how many are done."""
        for done, client in enumerate(self.clients, 1):
            yield done, client
            self.on_progress(phase, done, self.roster)

    def train(self, round_stamp: Stamp) -> list[TrainReply]:
        return [client.train(round_stamp) for _, client in self._each("train")]

    def seal(
        self, round_stamp: Stamp, total_samples: int, scales: bytes | None
    ) -> Iterator[FitReply]:
        for done, client in enumerate(self.clients, 1):
            reply = client.seal(round_stamp, total_samples, scales)
            self.on_progress("encrypt", done, self.roster)
            yield reply

    def apply(self, round_stamp: Stamp, payload: bytes, scales: bytes | None) -> list[ApplyReply]:
        return [client.apply(payload, round_stamp, scales) for _, client in self._each("apply")]

    def evaluate(self, round_num: int) -> list[EvalReply]:
        replies = [client.evaluate(round_num) for _, client in self._each("evaluate")]
        return [reply for reply in replies if reply is not None]
