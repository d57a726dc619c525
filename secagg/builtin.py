"""The built-in jobs as a task like any user's: image classification on ``digits``,
``digits32``, MNIST, Fashion-MNIST or CIFAR-10 with the ``mlp``, ``cnn`` or ``moderate-cnn``
model, trained with SGD (momentum) or Adam and cross-entropy.

It reads the job's own settings (``dataset``, ``model``, ``alpha``, ``min_client_samples``,
``local_epochs``, ``batch_size``, ``optimizer``, ``lr`` and its schedule, ``momentum``,
``fedprox_mu``), so ``secagg run`` without a ``task`` runs it. These datasets are small: each
is loaded once per process and kept as tensors; a client of a simulation takes its Dirichlet
shard. The test set is the dataset's own, the same for every client, so in a simulation only
client 0 evaluates.

``task_for`` says which task a job runs: the user's, or this one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from secagg.config import RunConfig
from secagg.data import SHAPES, Dataset, Split, dirichlet_partition, load_dataset
from secagg.models import build_model
from secagg.task import EvalResult, RoundContext, Site, Task, TrainResult, load_task


@dataclass
class Shard:
    """One client's training examples, and the test set when it evaluates."""

    train: Split
    test: Split | None

    def on(self, device: torch.device) -> Shard:
        """The shard with its tensors on ``device`` (moved once, then kept there)."""
        if self.train.x.device != device:
            self.train = Split(self.train.x.to(device), self.train.y.to(device))
            if self.test is not None:
                self.test = Split(self.test.x.to(device), self.test.y.to(device))
        return self


class Classification(Task):
    """A built-in dataset and model with the job's optimizer settings."""

    def __init__(
        self,
        dataset: str = "digits",
        model: str = "mlp",
        alpha: float = 1.0,
        min_client_samples: int = 10,
        data_dir: str = "data",
        download: bool = False,
    ) -> None:
        self.dataset = dataset
        self.model = model
        self.alpha = alpha
        self.min_client_samples = min_client_samples
        self.data_dir = data_dir
        self.download = download

    def _data(self, data_dir: str | Path | None = None, download: bool | None = None) -> Dataset:
        return _load(
            self.dataset,
            str(data_dir or self.data_dir),
            self.download if download is None else download,
        )

    def build_model(self) -> nn.Module:
        # Seeded by the caller: build_model's own seeding repeats it, so the weights are the
        # job's whichever seeds first.
        in_shape, classes = SHAPES[self.dataset]  # no data needed to build it
        return build_model(self.model, in_shape, classes, torch.initial_seed())

    def load_data(self, site: Site) -> Shard:
        data = self._data(site.data_dir, site.download or self.download)
        if not site.partition:
            return Shard(data.train, data.test)
        shards = _partition(
            self.dataset,
            str(site.data_dir),
            site.clients,
            self.alpha,
            site.seed,
            self.min_client_samples,
        )
        return Shard(data.train.subset(shards[site.index]), data.test if site.index == 0 else None)

    def train(self, model: nn.Module, data: Shard, ctx: RoundContext) -> TrainResult:
        settings = ctx.config
        shard = data.on(ctx.device)
        generator = ctx.generator()
        model.train()
        # A fresh optimizer each round: its state (momentum, Adam moments) stays local. The lr
        # is this round's under the job's schedule.
        optimizer: torch.optim.Optimizer
        if settings.optimizer == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=ctx.lr)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=settings.momentum)
        loss_fn = nn.CrossEntropyLoss()
        total, count = 0.0, 0
        for _ in range(settings.local_epochs):
            for xb, yb in _batches(shard.train, settings.batch_size, generator):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                # FedProx: zero (and no change at all) unless the job sets fedprox_mu.
                (loss + ctx.proximal(model)).backward()
                optimizer.step()
                total += float(loss.detach()) * len(yb)
                count += len(yb)
        return TrainResult(len(shard.train), {"loss": total / max(count, 1)})

    def evaluate(self, model: nn.Module, data: Shard, ctx: RoundContext) -> EvalResult | None:
        if data.test is None:
            return None
        test = data.on(ctx.device).test
        assert test is not None
        model.eval()
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for xb, yb in _batches(test, 1024, None):
                logits = model(xb)
                total_loss += float(loss_fn(logits, yb))
                correct += int((logits.argmax(1) == yb).sum())
        n = len(test)
        return EvalResult(total_loss / n, n, {"accuracy": correct / n})


@functools.lru_cache(maxsize=2)
def _load(name: str, data_dir: str, download: bool) -> Dataset:
    """A built-in dataset, loaded once per process (every simulated client shares it)."""
    return load_dataset(name, data_dir, download)


@functools.lru_cache(maxsize=4)
def _partition(
    name: str, data_dir: str, clients: int, alpha: float, seed: int, min_size: int
) -> list[np.ndarray]:
    """The job's Dirichlet shards, computed once per process (index lists, not copies)."""
    labels = _load(name, data_dir, False).train.y.numpy()
    return dirichlet_partition(labels, clients, alpha, seed, min_size)


def _batches(
    split: Split, size: int, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(split.x.device)
    for start in range(0, n, size):
        index = order[start : start + size]
        yield split.x[index], split.y[index]


def task_for(config: RunConfig, task: Task | None = None) -> Task:
    """The job's task: ``task`` when given, else the one ``config.task`` names (with
    ``config.task_settings``), else the built-in classification task of ``config.dataset`` and
    ``config.model``."""
    if task is not None:
        return task
    if config.task:
        return load_task(config.task, config.task_settings)
    return Classification(
        config.dataset,
        config.model,
        config.alpha,
        config.min_client_samples,
        config.data_dir,
        config.download,
    )
