"""A federated client: train, flatten, weight; agree on steps, quantize, encrypt; decrypt, apply.

A client sends its *update* relative to the global model, ``p_i * (w_i - w_global)`` with
``p_i = n_i / N`` (its share of the round's samples), and ``p_i`` itself. The server only adds
(it needs no plaintext multiply), and every client divides the sum by the summed weight after
decrypting: the divisor counts exactly the clients whose updates were summed, so a client that
dropped out does not skew the average.

With an integer codec a round has two exchanges: first the clients agree on quantization steps
(``secagg.quantize``: each encrypts how large its update is per block, the server adds), then
each quantizes on those steps and sends its update. Every client holds the same global model,
bit for bit: the decrypted aggregates are exact integers, identical on every client, and so is
everything computed from them. A client that rejoins replays the rounds' aggregates (the
update and its scales) to reach the same model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from secagg import quantize
from secagg.crypto import ClientCipher, Stamp, Update
from secagg.data import Split
from secagg.errors import PayloadError
from secagg.flatten import flatten, unflatten
from secagg.messages import ApplyReply, EvalReply, FitReply, RoundPlan


@dataclass(frozen=True)
class TrainSettings:
    local_epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    seed: int


@dataclass
class Trained:
    """A client's weighted update after training, waiting for the round's steps."""

    stamp: Stamp
    values: np.ndarray
    weight: float
    loss: float
    seconds: dict[str, float]


class Client:
    """Holds one party's data, model and client-side cipher."""

    def __init__(
        self,
        client_id: int,
        model: nn.Module,
        train: Split,
        test: Split | None,
        cipher: ClientCipher,
        settings: TrainSettings,
        device: torch.device,
    ) -> None:
        self.client_id = client_id
        self.device = device
        self.model = model.to(device)
        self.train_data = Split(train.x.to(device), train.y.to(device))
        self.test_data = None if test is None else Split(test.x.to(device), test.y.to(device))
        self.cipher = cipher
        self.settings = settings
        #: the global model as a flat vector, identical on every client
        self.global_vector, self.layout = flatten(self.model.state_dict())
        self.blocks = quantize.block_sizes(self.layout)
        self._trained: Trained | None = None
        #: the last scale aggregate decrypted: (its key, the steps, who contributed)
        self._steps: tuple[bytes, np.ndarray, tuple[int, ...]] | None = None

    @property
    def quantizes(self) -> bool:
        """Whether this client's codec needs the round's scale exchange."""
        return self.cipher.sum_limit is not None

    def train(self, plan: RoundPlan) -> bytes | None:
        """Step 1 of a round: train from the global model, flatten, weight; keep the update.

        Returns the encrypted magnitude histogram of the update for the scale exchange, or None
        when the codec does not quantize.
        """
        n = len(self.train_data)
        if not 0 < n <= plan.total_samples:
            raise PayloadError(
                f"client {self.client_id} has {n} samples, the round plan counts "
                f"{plan.total_samples} in all; the plan is wrong",
                "bad-plan",
            )
        start = time.perf_counter()
        # Always from the global model: a round tried again (the server restarted, or too few
        # sites delivered) must not start from this client's own earlier attempt.
        self.model.load_state_dict(unflatten(self.global_vector, self.layout))
        loss = self._train(plan.round.round_num)
        _sync(self.device)
        trained = time.perf_counter()
        vector, _ = flatten(self.model.state_dict())
        weight = n / plan.total_samples
        values = vector - self.global_vector
        values *= weight
        if not np.isfinite(values).all():
            raise PayloadError(
                f"client {self.client_id}'s update has NaN or infinite values: training "
                "diverged; lower --lr",
                "diverged",
            )
        stamp = plan.round.for_sender(self.client_id)
        seconds = {"train": trained - start, "flatten": time.perf_counter() - trained}
        self._trained = Trained(stamp, values, weight, loss, seconds)
        if not self.quantizes:
            return None
        start = time.perf_counter()
        scales = Update(quantize.histogram(values, self.blocks), weight)
        payload = self.cipher.encrypt(scales, stamp.scales())
        seconds["scales_encrypt"] = time.perf_counter() - start
        return payload

    def seal(self, round_stamp: Stamp, scales: bytes | None) -> FitReply:
        """Step 3: quantize the update on the round's agreed steps (decrypted from ``scales``,
        the summed histograms) and encrypt it."""
        trained = self._trained
        if trained is None or trained.stamp != round_stamp.for_sender(self.client_id):
            raise PayloadError(
                f"client {self.client_id} has no trained update for round {round_stamp.round_num}",
                "bad-plan",
            )
        self._trained = None
        clipped = 0
        values = trained.values
        if self.quantizes:
            start = time.perf_counter()
            steps = self._round_steps(round_stamp, scales)
            trained.seconds["scales_decrypt"] = time.perf_counter() - start
            values, clipped = quantize.quantize(values, steps, self.blocks)
        payload = self.cipher.encrypt(Update(values, trained.weight, clipped), trained.stamp)
        seconds = {
            **trained.seconds,
            "encrypt": self.cipher.last_seconds["encrypt"],
            "serialize": self.cipher.last_seconds["serialize"],
        }
        n = len(self.train_data)
        return FitReply(self.client_id, payload, n, trained.loss, seconds, len(payload))

    def apply(self, payload: bytes, round_stamp: Stamp, scales: bytes | None) -> ApplyReply:
        """Decrypt the summed update, check its ledger, dequantize it on the round's steps,
        divide by the total weight, and add it to the global model."""
        start = time.perf_counter()
        aggregate = self.cipher.decrypt(payload, round_stamp)
        if aggregate.values.shape != (self.layout.size,):
            raise PayloadError(
                f"global update has {aggregate.values.size} values, this client's model has "
                f"{self.layout.size}; are all parties running the same job?",
                "wrong-length",
            )
        update = aggregate.values / aggregate.weight
        if self.quantizes:
            steps = self._round_steps(round_stamp, scales, aggregate.contributors)
            quantize.dequantize(update, steps, self.blocks)
        decrypted = time.perf_counter()
        state = unflatten(self.global_vector + update, self.layout)
        self.model.load_state_dict(state)
        self.global_vector = flatten(self.model.state_dict())[0]
        seconds = {"decrypt": decrypted - start, "unflatten": time.perf_counter() - decrypted}
        return ApplyReply(
            self.client_id, seconds, aggregate.clipped, aggregate.weight, aggregate.contributors
        )

    def _round_steps(
        self, round_stamp: Stamp, scales: bytes | None, updaters: tuple[int, ...] = ()
    ) -> np.ndarray:
        """The round's quantization steps, from its summed histograms (decrypted once)."""
        if scales is None:
            raise PayloadError("an integer codec needs the round's scale aggregate", "malformed")
        key = bytes(scales[-32:]) + round_stamp.job + round_stamp.round_num.to_bytes(4, "big")
        if self._steps is None or self._steps[0] != key:
            summed = self.cipher.decrypt(scales, round_stamp.scales())
            if summed.values.shape != (self.blocks.size * quantize.BINS,):
                raise PayloadError(
                    "the scale aggregate does not match this client's model; are all parties "
                    "running the same job?",
                    "wrong-length",
                )
            limit = self.cipher.sum_limit or 0
            steps = quantize.steps(summed.values, len(summed.contributors), limit)
            self._steps = (key, steps, summed.contributors)
        _, steps, agreed = self._steps
        if not set(updaters) <= set(agreed):
            raise PayloadError(
                f"the aggregate adds updates of client(s) {sorted(set(updaters) - set(agreed))} "
                "that took no part in the round's scale exchange: the sum may have overflowed",
                "not-in-round",
            )
        return steps

    def evaluate(self) -> EvalReply:
        """Loss and accuracy of the current (global) model on this client's test data."""
        if self.test_data is None:
            raise ValueError(f"client {self.client_id} has no test data")
        self.model.eval()
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for xb, yb in _batches(self.test_data, 1024, None):
                logits = self.model(xb)
                total_loss += float(loss_fn(logits, yb))
                correct += int((logits.argmax(1) == yb).sum())
        n = len(self.test_data)
        return EvalReply(self.client_id, total_loss / n, correct / n, n)

    def _train(self, round_num: int) -> float:
        s = self.settings
        # Seeded per (job, round, client): a resumed run trains exactly as an uninterrupted one.
        generator = torch.Generator().manual_seed(
            s.seed * 1_000_003 + round_num * 1009 + self.client_id
        )
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        self.model.train()
        # A fresh optimizer each round: its state (momentum, Adam moments) stays local.
        optimizer: torch.optim.Optimizer
        if s.optimizer == "adam":
            optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr)
        else:
            optimizer = torch.optim.SGD(self.model.parameters(), lr=s.lr, momentum=s.momentum)
        loss_fn = nn.CrossEntropyLoss()
        total, count = 0.0, 0
        for _ in range(s.local_epochs):
            for xb, yb in _batches(self.train_data, s.batch_size, generator):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(self.model(xb), yb)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(yb)
                count += len(yb)
        return total / max(count, 1)


def _batches(
    split: Split, size: int, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(split.x.device)
    for start in range(0, n, size):
        index = order[start : start + size]
        yield split.x[index], split.y[index]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
