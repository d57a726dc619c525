"""In-process transport: clients are objects in this process, run one after another.

Payloads still cross as bytes, so bytes on the wire are measured exactly as a network run
would send them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from secagg.client import Client
from secagg.crypto import Stamp
from secagg.messages import ApplyReply, EvalReply, FitReply, RoundPlan


class InProcessTransport:
    def __init__(self, clients: Sequence[Client], evaluators: Sequence[int] = (0,)) -> None:
        self.clients = list(clients)
        self.evaluators = list(evaluators)
        self.roster = len(self.clients)

    def train(self, round_stamp: Stamp) -> list[bytes]:
        plan = RoundPlan(round_stamp, sum(len(client.train_data) for client in self.clients))
        scales = [client.train(plan) for client in self.clients]
        return [payload for payload in scales if payload is not None]

    def seal(self, round_stamp: Stamp, scales: bytes | None) -> Iterator[FitReply]:
        for client in self.clients:
            yield client.seal(round_stamp, scales)

    def apply(self, round_stamp: Stamp, payload: bytes, scales: bytes | None) -> list[ApplyReply]:
        return [client.apply(payload, round_stamp, scales) for client in self.clients]

    def evaluate(self, round_num: int) -> list[EvalReply]:
        return [self.clients[i].evaluate() for i in self.evaluators]
