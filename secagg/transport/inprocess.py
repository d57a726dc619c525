"""In-process transport: clients are objects in this process, run one after another.

Payloads still cross as bytes, so bytes on the wire are measured exactly as a network run
would send them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from secagg.client import Client
from secagg.crypto import Stamp
from secagg.messages import ApplyReply, EvalReply, FitReply, TrainReply


class InProcessTransport:
    def __init__(self, clients: Sequence[Client]) -> None:
        self.clients = list(clients)
        self.roster = len(self.clients)

    def tensor_sizes(self) -> list[int]:
        return [entry.size for entry in self.clients[0].layout.entries]

    def train(self, round_stamp: Stamp) -> list[TrainReply]:
        return [client.train(round_stamp) for client in self.clients]

    def seal(
        self, round_stamp: Stamp, total_samples: int, scales: bytes | None
    ) -> Iterator[FitReply]:
        for client in self.clients:
            yield client.seal(round_stamp, total_samples, scales)

    def apply(self, round_stamp: Stamp, payload: bytes, scales: bytes | None) -> list[ApplyReply]:
        return [client.apply(payload, round_stamp, scales) for client in self.clients]

    def evaluate(self, round_num: int) -> list[EvalReply]:
        replies = (client.evaluate(round_num) for client in self.clients)
        return [reply for reply in replies if reply is not None]
