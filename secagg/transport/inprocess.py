"""In-process transport: clients are objects in this process, run one after another.

Payloads still cross as bytes, so bytes on the wire are measured exactly as a network run
would send them. A round's clients are numbered by their position in the round (the senders
of its payloads); ``sample`` says which clients of the population take part in each round.
When that is fewer than the population, a few reusable clients (``slots``) take on the
identities of each round's clients (``Client.become``): memory and time grow with the clients
per round, not with the population. A simulation's ``evaluator`` (client 0, which holds the
built-in tasks' test set) also evaluates every round it did not train in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

from secagg.client import Client
from secagg.crypto import MaskRoster, Reveal, Stamp
from secagg.messages import ApplyReply, EvalReply, FitReply, TrainReply
from secagg.task import Site
from secagg.transport import Progress, no_progress


class InProcessTransport:
    """``on_progress`` hears each client finish each step (``("train", 3, 8)``)."""

    def __init__(
        self,
        slots: Sequence[Client],
        sample: Callable[[int], list[int]] | None = None,
        site_for: Callable[[int], Site] | None = None,
        evaluator: Client | None = None,
        on_progress: Progress = no_progress,
    ) -> None:
        self.slots = list(slots)
        #: how many clients take part in each round
        self.roster = len(self.slots)
        self.sample = sample or (lambda round_num: list(range(len(self.slots))))
        self.site_for = site_for
        self.evaluator = evaluator
        self.on_progress = on_progress
        #: the current attempt's keys, as its clients advertised them (None: no masks)
        self._masks: MaskRoster | None = None

    @property
    def holder(self) -> Client:
        """A client that holds the global model after every round."""
        return self.evaluator or self.slots[0]

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.holder.model.parameters())

    def model_bytes(self) -> bytes:
        """The global model (a torch state dict, serialized) as the clients hold it."""
        return self.holder.model_bytes()

    def close(self) -> None:
        pass

    def tensor_sizes(self) -> list[int]:
        return [entry.size for entry in self.holder.payload_layout.entries]

    def _each(self, phase: str, clients: Sequence[Client]) -> Iterator[tuple[int, Client]]:
        """The clients in turn, with their position in the round; after each one's step, say
        how many are done."""
        for position, client in enumerate(clients):
            yield position, client
            self.on_progress(phase, position + 1, len(clients))

    def attempt(self, round_num: int, tries: int) -> bytes:
        return os.urandom(16)  # its clients live in this process: no attempt outlives it

    def train(self, round_stamp: Stamp) -> list[TrainReply]:
        chosen = self.sample(round_stamp.round_num)
        for slot, index in zip(self.slots, chosen, strict=True):
            if slot.site.index != index:
                assert self.site_for is not None, "a sampled round needs site_for"
                slot.become(self.site_for(index))
        # Every client's job key was published when it joined; the round's are relayed by
        # position with the advertise step (none when the clients do not mask), and the
        # attempt's adverts and sealed shares with the train task.
        keys = [slot.mask_key(round_stamp.job) for slot in self.slots]
        nonce = round_stamp.attempt or os.urandom(16)  # a round tried again masks afresh
        self._masks = None
        if None not in keys:
            advertised = [
                slot.advertise(round_stamp.for_sender(position), keys, nonce)
                for position, slot in enumerate(self.slots)
            ]
            policy = self.slots[0].config.policy()
            self._masks = MaskRoster.of(round_stamp.job, nonce, keys, advertised, policy)
        masks = self._masks
        return [
            slot.train(
                round_stamp.for_sender(position),
                () if masks is None else masks.adverts,
                None if masks is None else masks.sealed_to(position),
                nonce,
            )
            for position, slot in self._each("train", self.slots)
        ]

    def masks(self, round_num: int) -> MaskRoster | None:
        return self._masks

    def unmask(self, stamp: Stamp, survivors: tuple[int, ...]) -> list[Reveal]:
        signed = {p: self.slots[p].confirm(stamp.for_sender(p), survivors) for p in survivors}
        return [self.slots[p].reveal(stamp.for_sender(p), survivors, signed) for p in survivors]

    def seal(
        self, round_stamp: Stamp, total_samples: int, scales: bytes | None
    ) -> Iterator[FitReply]:
        for position, slot in enumerate(self.slots):
            reply = slot.seal(round_stamp.for_sender(position), total_samples, scales)
            self.on_progress("encrypt", position + 1, self.roster)
            yield reply

    def apply(self, round_stamp: Stamp, payload: bytes, scales: bytes | None) -> list[ApplyReply]:
        replies = [
            c.apply(payload, round_stamp, scales) for _, c in self._each("apply", self.slots)
        ]
        if self.evaluator is not None:
            self.evaluator.apply(payload, round_stamp, scales)
        return replies

    def _evaluating(self) -> list[Client]:
        """The round's clients, and the evaluator when it did not train in the round."""
        clients = list(self.slots)
        if self.evaluator is not None and all(c.site != self.evaluator.site for c in clients):
            clients.append(self.evaluator)
        return clients

    def evaluators(self, round_num: int) -> int:
        return len(self._evaluating())

    def evaluate(self, stamp: Stamp) -> list[EvalReply]:
        clients = self._evaluating()
        unmasked = stamp.roster != self.roster  # the evaluator holds none of the round's keys
        replies = [
            c.evaluate(stamp.for_sender(p), unmasked) for p, c in self._each("evaluate", clients)
        ]
        return [reply for reply in replies if reply is not None]

    def averages(self, stamp: Stamp, payload: bytes) -> list[dict[str, float]]:
        views = (c.averages(stamp, payload) for c in self._evaluating())
        return [view for view in views if view is not None]
