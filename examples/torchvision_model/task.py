"""A torchvision architecture trained from scratch, with the user's own learning-rate schedule
and gradient clipping: the workload of Flower's advanced-pytorch example, offline.

Job files name it ``torchvision_model.task:TorchvisionModel`` with ``examples/`` on PYTHONPATH.
The data are scikit-learn's bundled 8x8 digits, upscaled to 3x32x32 (CIFAR-sized) tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from secagg import EvalResult, RoundContext, Site, Task, TrainResult


def digits32(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, test): the 1,797 digits as normalized 3x32x32 tensors, a fifth held out; the
    split depends only on ``seed``, so every site draws the same one."""
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.from_numpy(digits.target).long()
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    cut = len(y) // 5
    test, train = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def shard(data: TensorDataset, site: Site, limit: int) -> TensorDataset:
    """This site's share: every ``clients``-th example from its index (all of them when the
    site's data is its own), at most ``limit`` (0: no limit)."""
    tensors = data.tensors
    if site.partition:
        tensors = tuple(t[site.index :: site.clients] for t in tensors)
    if limit:
        tensors = tuple(t[:limit] for t in tensors)
    return TensorDataset(*tensors)


class TorchvisionModel(Task):
    """Any torchvision classifier by name (``arch``), built with ``weights=None`` (random
    initial weights, nothing downloaded). Per round: SGD with momentum and weight decay, a
    cosine learning-rate schedule across the whole federated run, gradient norm clipped to
    ``max_grad_norm``. BatchNorm layers get ``bn_momentum``. ``train_limit`` and ``test_limit``
    cap each site's examples (0: all)."""

    def __init__(
        self,
        arch: str = "mobilenet_v3_small",
        max_grad_norm: float = 1.0,
        weight_decay: float = 5e-4,
        bn_momentum: float = 0.1,
        train_limit: int = 0,
        test_limit: int = 0,
    ):
        self.arch = arch
        self.max_grad_norm = max_grad_norm
        self.weight_decay = weight_decay
        self.bn_momentum = bn_momentum
        self.train_limit = train_limit
        self.test_limit = test_limit

    def build_model(self) -> nn.Module:
        model = torchvision.models.get_model(self.arch, weights=None, num_classes=10)
        # MobileNetV3 ships BatchNorm momentum 0.01, tuned for ImageNet's many steps: after a
        # few dozen steps a round its running statistics are still near their initial values,
        # and eval() mode predicts one class. 0.1 (PyTorch's default) tracks them in time.
        for layer in model.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.momentum = self.bn_momentum
        return model

    def load_data(self, site: Site) -> dict[str, TensorDataset]:
        train, test = digits32(site.seed)
        return {
            "train": shard(train, site, self.train_limit),
            "test": shard(test, site, self.test_limit),
        }

    def train(
        self, model: nn.Module, data: dict[str, TensorDataset], ctx: RoundContext
    ) -> TrainResult:
        train = data["train"]
        # BatchNorm cannot train on a batch of one image whose features are 1x1 (MobileNet's
        # last stage at 32x32): drop the last, short batch.
        loader = DataLoader(
            train,
            batch_size=min(ctx.config.batch_size, len(train)),
            shuffle=True,
            drop_last=True,
            generator=ctx.generator(),
        )
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=ctx.config.lr,
            momentum=ctx.config.momentum,
            weight_decay=self.weight_decay,
        )
        # The optimizer is new each round, so the schedule is placed by the round: cosine from
        # lr to 0 over every step of every round of the run.
        steps = ctx.config.local_epochs * len(loader)
        done, total = (ctx.round - 1) * steps, ctx.rounds * steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * (done + step) / total))
        )
        model.train()
        loss_sum, seen, grad_norm = 0.0, 0, 0.0
        for _ in range(ctx.config.local_epochs):
            for images, labels in loader:
                images, labels = images.to(ctx.device), labels.to(ctx.device)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm).item()
                optimizer.step()
                schedule.step()
                loss_sum, seen = loss_sum + loss.item() * len(labels), seen + len(labels)
        return TrainResult(
            num_samples=len(train),
            metrics={
                "loss": loss_sum / max(seen, 1),
                "lr": schedule.get_last_lr()[0],
                "grad_norm": grad_norm,  # the last step's norm, before clipping
            },
        )

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: dict[str, TensorDataset], ctx: RoundContext
    ) -> EvalResult:
        model.eval()  # BatchNorm uses the averaged running statistics
        images, labels = (t.to(ctx.device) for t in data["test"].tensors)
        logits = torch.cat([model(batch) for batch in images.split(256)])
        return EvalResult(
            loss=F.cross_entropy(logits, labels).item(),
            num_samples=len(labels),
            metrics={"accuracy": (logits.argmax(1) == labels).float().mean().item()},
        )
