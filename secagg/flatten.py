"""flatten / unflatten: a model's whole state as one float64 vector and back.

Every parameter and every buffer is covered, so BatchNorm running statistics are averaged like
weights. Integer buffers (BatchNorm's ``num_batches_tracked``) are carried as floats, averaged
with the same sample weights, and rounded back to their integer type on ``unflatten``: the
result is the weighted mean count, which is what a client that had seen that share of batches
would hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from secagg.privacy import EXTRA, extra_sizes

if TYPE_CHECKING:
    from secagg.config import RunConfig


@dataclass(frozen=True)
class Entry:
    """Where one tensor sits in the flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    size: int


@dataclass(frozen=True)
class Layout:
    """The order, shapes and dtypes of a state dict, so a vector can be put back."""

    entries: tuple[Entry, ...]

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.entries)


def payload_layout(layout: Layout, config: RunConfig) -> Layout:
    """``layout`` as the job's updates carry it: with DP, a float64 tensor after the model's
    (adaptive clipping's signal and the rotation's padding, ``privacy.extra_sizes``)."""
    entries, offset = list(layout.entries), layout.size
    for size in extra_sizes(layout.size, config):
        entries.append(Entry(EXTRA, (size,), torch.float64, offset, size))
        offset += size
    return Layout(tuple(entries))


def layout_of(state: Mapping[str, torch.Tensor]) -> Layout:
    """The layout of a state dict, without copying any data."""
    entries, offset = [], 0
    for name, tensor in state.items():
        size = tensor.numel()
        entries.append(Entry(name, tuple(tensor.shape), tensor.dtype, offset, size))
        offset += size
    return Layout(tuple(entries))


def flatten(state: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, Layout]:
    """Concatenate every tensor of ``state`` into one float64 vector; return it and its layout."""
    layout = layout_of(state)
    vector = np.empty(layout.size, dtype=np.float64)
    for entry in layout.entries:
        values = state[entry.name].detach().to("cpu", torch.float64).reshape(-1)
        vector[entry.offset : entry.offset + entry.size] = values.numpy()
    return vector, layout


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, torch.Tensor]:
    """Rebuild a state dict from a flat vector; integer tensors are rounded to their dtype."""
    if vector.shape != (layout.size,):
        raise ValueError(f"vector has shape {vector.shape}, layout needs ({layout.size},)")
    state = {}
    for entry in layout.entries:
        values = torch.from_numpy(vector[entry.offset : entry.offset + entry.size].copy())
        if entry.dtype.is_floating_point or entry.dtype.is_complex:
            tensor = values.to(entry.dtype)
        elif entry.dtype == torch.bool:
            tensor = values.round() != 0
        else:
            tensor = values.round().to(entry.dtype)
        state[entry.name] = tensor.reshape(entry.shape)
    return state


def describe(layout: Layout) -> list[tuple[str, tuple[int, ...], str]]:
    """A layout as plain values (name, shape, dtype) that parties can compare and send."""
    return [
        (entry.name, entry.shape, str(entry.dtype).removeprefix("torch."))
        for entry in layout.entries
    ]
