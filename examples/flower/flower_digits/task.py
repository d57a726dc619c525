"""The model, the data and the training loop: plain PyTorch, as in Flower's quickstart (the
digits come bundled with scikit-learn, so the example needs no download)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


class Net(nn.Module):
    """An MLP over the 64 pixels; ``hidden`` units (32: 2,410 parameters)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_data(partition: int, partitions: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """This node's share of the digits: every ``partitions``-th row from ``partition`` on;
    its last fifth held out for testing."""
    digits = load_digits()
    x = torch.tensor(digits.data[partition::partitions] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[partition::partitions], dtype=torch.long)
    cut = len(y) * 4 // 5
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def train(
    net: Net, data: tuple[torch.Tensor, torch.Tensor], epochs: int, lr: float, seed: int
) -> float:
    """SGD over the node's rows in minibatches of 32; the mean training loss."""
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(batch), seen + len(batch)
    return total / max(seen, 1)


def test(net: Net, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """The loss and accuracy on the node's test rows."""
    x, y = data
    net.eval()
    with torch.no_grad():
        logits = net(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, float((logits.argmax(1) == y).float().mean())


def seed_of(partition: int, round_num: int) -> int:
    return int(np.uint32(1009 * round_num + partition))
