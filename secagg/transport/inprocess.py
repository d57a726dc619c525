"""In-process transport: clients are objects in this process, run one after another.

Payloads still cross as bytes, so bytes on the wire are measured exactly as a network run
would send them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from secagg.client import ApplyReply, Client, EvalReply, FitReply, RoundPlan


class InProcessTransport:
    def __init__(self, clients: Sequence[Client], evaluators: Sequence[int] = (0,)) -> None:
        self.clients = list(clients)
        self.evaluators = list(evaluators)

    def fit(self, round_num: int) -> Iterator[FitReply]:
        total = sum(len(client.train_data) for client in self.clients)
        plan = RoundPlan(round_num, len(self.clients), total)
        for client in self.clients:
            yield client.fit(plan)

    def apply(self, round_num: int, payload: bytes) -> list[ApplyReply]:
        return [client.apply(payload, round_num) for client in self.clients]

    def evaluate(self, round_num: int) -> list[EvalReply]:
        return [self.clients[i].evaluate() for i in self.evaluators]
