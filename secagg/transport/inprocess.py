"""In-process transport: clients are objects in this process, trained one after another.

Payloads still cross as bytes, so bytes on the wire are measured exactly as a network run
would send them. With ``overlap`` (the default) a client's update is encrypted in a
background thread while the next client trains, as it would be on separate machines: on a GPU
the encryption runs on CPU cores the training does not use, and on a CPU it fills the cores
training leaves idle. Results are identical either way; only wall time changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from secagg.client import ApplyReply, Client, EvalReply, FitReply, RoundPlan
from secagg.crypto import Stamp


class InProcessTransport:
    def __init__(
        self, clients: Sequence[Client], evaluators: Sequence[int] = (0,), overlap: bool = True
    ) -> None:
        self.clients = list(clients)
        self.evaluators = list(evaluators)
        self.overlap = overlap
        self.roster = len(self.clients)

    def fit(self, round_stamp: Stamp) -> Iterator[FitReply]:
        total = sum(len(client.train_data) for client in self.clients)
        plan = RoundPlan(round_stamp, total)
        if not self.overlap:
            for client in self.clients:
                yield client.fit(plan)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="secagg-seal") as sealer:
            pending: Future[FitReply] | None = None
            for client in self.clients:
                sealing = sealer.submit(client.seal, client.train(plan))
                if pending is not None:
                    yield pending.result()  # the server adds it while `sealing` encrypts
                pending = sealing
            if pending is not None:
                yield pending.result()

    def apply(self, round_stamp: Stamp, payload: bytes) -> list[ApplyReply]:
        return [client.apply(payload, round_stamp) for client in self.clients]

    def evaluate(self, round_num: int) -> list[EvalReply]:
        return [self.clients[i].evaluate() for i in self.evaluators]
