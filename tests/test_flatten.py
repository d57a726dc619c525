"""flatten / unflatten round trips on the real models, buffers included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secagg.flatten import flatten, unflatten
from secagg.models import build_model


@pytest.mark.parametrize(
    ("name", "shape"), [("mlp", (1, 8, 8)), ("cnn", (1, 28, 28)), ("moderate-cnn", (3, 32, 32))]
)
def test_flatten_unflatten_round_trip(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10, seed=1)
    model(torch.zeros(2, *shape))  # one training-mode pass moves BatchNorm buffers
    state = model.state_dict()
    vector, layout = flatten(state)
    assert vector.size == sum(t.numel() for t in state.values())
    restored = unflatten(vector, layout)
    assert list(restored) == list(state)
    for key, tensor in state.items():
        assert restored[key].dtype == tensor.dtype
        assert torch.equal(restored[key], tensor), key
    fresh = build_model(name, shape, 10, seed=2)
    fresh.load_state_dict(restored)


def test_integer_buffers_are_averaged_and_rounded() -> None:
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    state = model.state_dict()
    key = next(k for k in state if k.endswith("num_batches_tracked"))
    vector, layout = flatten(state)
    entry = next(e for e in layout.entries if e.name == key)
    vector[entry.offset] = 6.6  # a weighted mean of counts
    assert unflatten(vector, layout)[key].item() == 7
    assert unflatten(vector, layout)[key].dtype == torch.long


def test_moderate_cnn_matches_the_peer_parameter_count() -> None:
    model = build_model("moderate-cnn", (3, 32, 32), 10, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 3_491_530


def test_unflatten_refuses_a_vector_of_the_wrong_size() -> None:
    _, layout = flatten(build_model("mlp", (1, 8, 8), 10, seed=0).state_dict())
    with pytest.raises(ValueError, match="layout needs"):
        unflatten(np.zeros(layout.size + 1), layout)
