"""A federated client: train, flatten, weight, encrypt; decrypt, divide, unflatten, load.

The client weights its own update by its sample count and appends that count as one extra
value, so the server only adds (it needs no plaintext multiply) and every client divides by the
total weight after decrypting. The divisor therefore counts exactly the clients whose updates
were summed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from secagg.crypto import ClientCipher
from secagg.data import Split
from secagg.errors import PayloadError
from secagg.flatten import Layout, flatten, unflatten


@dataclass(frozen=True)
class TrainSettings:
    local_epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    seed: int


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
class EvalReply:
    client_id: int
    loss: float
    accuracy: float
    num_samples: int


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
        self.layout: Layout = flatten(self.model.state_dict())[1]

    def fit(self, round_num: int) -> FitReply:
        """Train on local data from the current global model; return the encrypted update."""
        start = time.perf_counter()
        loss = self._train(round_num)
        _sync(self.device)
        trained = time.perf_counter()
        vector, _ = flatten(self.model.state_dict())
        weight = float(len(self.train_data))
        weighted = np.append(vector * weight, weight)
        flat = time.perf_counter()
        payload = self.cipher.encrypt(weighted, round_num)
        seconds = {
            "train": trained - start,
            "flatten": flat - trained,
            "encrypt": self.cipher.last_seconds["encrypt"],
            "serialize": self.cipher.last_seconds["serialize"],
        }
        return FitReply(self.client_id, payload, len(self.train_data), loss, seconds, len(payload))

    def apply(self, payload: bytes, round_num: int) -> dict[str, float]:
        """Decrypt the summed payload, divide by the total weight, load it; return timings."""
        start = time.perf_counter()
        values = self.cipher.decrypt(payload, round_num)
        decrypted = time.perf_counter()
        if values.shape != (self.layout.size + 1,):
            raise PayloadError(
                f"global model has {values.size - 1} values, this client's model has "
                f"{self.layout.size}; are all parties running the same job?"
            )
        total = values[-1]
        if not total >= 0.5:
            raise PayloadError(f"summed weight {total:.3g} is not a sample count; bad aggregate")
        state = unflatten(values[:-1] / total, self.layout)
        self.model.load_state_dict(state)
        return {"decrypt": decrypted - start, "unflatten": time.perf_counter() - decrypted}

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
