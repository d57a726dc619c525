"""Flower's arrays as a torch module, the one shape secagg's client and server both read."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn


class ArraysModel(nn.Module):
    """The global model as Flower arrays: a module holding each array under its own dotted
    name (floating arrays as parameters, others as buffers), so that secagg flattens, encrypts
    and updates it like any torch model, and hands it to the user's functions as arrays."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        for name, array in arrays.items():
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]  # type: ignore[assignment]
            tensor = torch.from_numpy(np.array(array, copy=True))
            if tensor.is_floating_point():
                owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
            else:
                owner.register_buffer(leaf, tensor)


def as_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays by name, as numpy."""
    return {name: array.numpy() for name, array in arrays.items()}


def tensor_sizes(arrays: ArrayRecord) -> list[int]:
    """How many values each array holds, in the order secagg flattens the model."""
    return [t.numel() for t in ArraysModel(as_numpy(arrays)).state_dict().values()]
