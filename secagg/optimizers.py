"""Federated optimization: the server optimizer, run on the clients, and the client's learning
rate per round.

**Server optimizers** (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).
Each round every client decrypts the same weighted average change ``delta`` (``Δ_t``), bit for
bit, so each can take the same server-optimizer step deterministically: the server still only
adds ciphertexts and learns nothing it did not learn before. With ``m`` and ``v`` the
optimizer's state (float64, one value per optimized position)::

    fedavg      x += η Δ                                   (η = 1: plain FedAvg)
    fedavgm     v = μ v + Δ;            x += η v           (server momentum, Hsu et al. 2019)
    fedadagrad  m = β1 m + (1-β1) Δ;    v = v + Δ²                       x += η m / (√v + τ)
    fedyogi     m = β1 m + (1-β1) Δ;    v = v - (1-β2) Δ² sign(v - Δ²)   x += η m / (√v + τ)
    fedadam     m = β1 m + (1-β1) Δ;    v = β2 v + (1-β2) Δ²             x += η m / (√v + τ)

with ``m`` starting at 0 and ``v`` at ``τ²`` (the paper's ``v_{-1} ≥ τ²``), no bias
correction (as in Algorithm 2). Only +, -, *, / and √ are used, each correctly rounded in IEEE
float64, in the order written in ``_step``: every client, on any machine, computes the same
bits from the same aggregates.

**What it applies to.** The model's floating-point *parameters* (``named_parameters``). Buffers
(BatchNorm running statistics, ``num_batches_tracked``) are statistics, not optimized weights:
they are averaged as in FedAvg. An Adam-like step normalizes every coordinate to about η, which
would push a small ``running_var`` below zero; the average of the clients' values stays valid.

**State.** ``ServerOptimizer`` holds its state (``steps``, ``m``, ``v``) apart from any client,
so several clients, or one shared global model, can own one. It is rebuilt exactly by replaying
the job's chain of aggregates in order, which ``--resume`` and a rejoining site already do.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from secagg.config import SERVER_OPTIMIZERS, RunConfig
from secagg.errors import ConfigError
from secagg.flatten import Layout

#: the server learning rate when the job does not set ``server_lr``
DEFAULT_SERVER_LR = {
    "fedavg": 1.0,
    "fedavgm": 1.0,
    "fedadam": 0.1,
    "fedyogi": 0.1,
    "fedadagrad": 0.1,
}


@dataclass(frozen=True)
class Hyper:
    """A server optimizer's hyper-parameters (the job's ``server_*``, ``beta1``, ``beta2``,
    ``tau``)."""

    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def of(cls, config: RunConfig) -> Hyper:
        """The job's server optimizer settings, with the optimizer's default learning rate when
        the job sets none."""
        lr = config.server_lr
        if lr is None:
            lr = DEFAULT_SERVER_LR[config.server_optimizer]
        return cls(
            config.server_optimizer,
            lr,
            config.server_momentum,
            config.beta1,
            config.beta2,
            config.tau,
        )


class ServerOptimizer:
    """The server optimizer's step and state, applied to the decrypted average change.

    ``positions`` are the indices of the flat model vector it optimizes (the parameters); the
    other positions take the plain average. ``steps`` counts the aggregates applied, so a
    caller can check they arrive in order.
    """

    def __init__(self, hyper: Hyper, positions: np.ndarray) -> None:
        if hyper.name not in SERVER_OPTIMIZERS:
            raise ConfigError(
                f"server_optimizer {hyper.name!r} is unknown; use one of "
                f"{', '.join(SERVER_OPTIMIZERS)}"
            )
        self.hyper = hyper
        self.positions = positions
        self.steps = 0
        #: first moment (adaptive) or momentum buffer (fedavgm); None until the first step
        self.m: np.ndarray | None = None
        #: second moment (adaptive only)
        self.v: np.ndarray | None = None

    @property
    def stateful(self) -> bool:
        """Whether a step depends on earlier ones (all but fedavg)."""
        return self.hyper.name != "fedavg"

    def update(self, delta: np.ndarray) -> np.ndarray:
        """The change to add to the global model for the average change ``delta`` (float64);
        advances the state by one step."""
        change = np.array(delta, dtype=np.float64)  # a copy: delta is left as it is
        change[self.positions] = self._step(change[self.positions])
        self.steps += 1
        return change

    def _step(self, delta: np.ndarray) -> np.ndarray:
        h = self.hyper
        if h.name == "fedavg":
            return h.lr * delta
        if h.name == "fedavgm":
            self.m = delta if self.m is None else h.momentum * self.m + delta
            return h.lr * self.m
        if self.m is None or self.v is None:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, h.tau * h.tau)
        self.m = h.beta1 * self.m + (1.0 - h.beta1) * delta
        square = delta * delta
        if h.name == "fedadagrad":
            self.v = self.v + square
        elif h.name == "fedyogi":
            self.v = self.v - (1.0 - h.beta2) * square * np.sign(self.v - square)
        else:  # fedadam
            self.v = h.beta2 * self.v + (1.0 - h.beta2) * square
        return h.lr * self.m / (np.sqrt(self.v) + h.tau)


def positions_of(layout: Layout, names: Collection[str]) -> np.ndarray:
    """The indices of the flat vector held by the floating-point entries named in ``names``
    (the model's parameters)."""
    ranges = [
        np.arange(entry.offset, entry.offset + entry.size, dtype=np.int64)
        for entry in layout.entries
        if entry.dtype.is_floating_point and entry.name in names
    ]
    return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)


def client_lr(config: RunConfig, round_num: int) -> float:
    """The client learning rate of round ``round_num`` (1 .. ``rounds``) under the job's
    ``lr_schedule``:

    - ``constant``: ``lr``;
    - ``step``: ``lr * lr_gamma ** ((round - 1) // lr_step_rounds)``;
    - ``cosine``: ``lr_min + (lr - lr_min) * (1 + cos(pi * (round - 1) / rounds)) / 2``, from
      ``lr`` in round 1 towards ``lr_min`` (as torch's ``CosineAnnealingLR`` stepped once per
      round with ``T_max = rounds``: the last round still trains).
    """
    if config.lr_schedule == "step":
        return config.lr * config.lr_gamma ** ((round_num - 1) // config.lr_step_rounds)
    if config.lr_schedule == "cosine":
        phase = math.pi * (round_num - 1) / config.rounds
        return config.lr_min + (config.lr - config.lr_min) * (1 + math.cos(phase)) / 2
    return config.lr
