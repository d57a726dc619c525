"""The ServerApp: Flower's quickstart with FedAvg swapped for secagg's HEFedAvg (one line).

``secagg-he = false`` in the run config runs Flower's own FedAvg instead, for comparison."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_digits.task import Net
from secagg.flower import HEFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, dict(context.run_config))


def run(grid: Grid, config: dict) -> None:  # type: ignore[type-arg]
    """The federated job, with the run config's settings."""
    rounds = int(config.get("num-server-rounds", 3))
    torch.manual_seed(int(config.get("seed", 0)))  # the same initial model in every run
    arrays = ArrayRecord(Net().state_dict())
    train_config = ConfigRecord({"lr": float(config.get("lr", 0.1)), "local-epochs": 1})
    nodes = int(config.get("min-nodes", 2))  # start once this many nodes are connected
    if config.get("secagg-he", True):
        # secagg: the one line (the server never holds the model: each node saves its own,
        # where its node config's secagg-save-model says)
        strategy = HEFedAvg(
            min_available_nodes=nodes,
            keys=str(config.get("secagg-keys", "keys")),
            checkpoint=str(config.get("checkpoint", "")),
        )
    else:
        strategy = FedAvg(min_available_nodes=nodes)
    result = strategy.start(
        grid=grid, initial_arrays=arrays, train_config=train_config, num_rounds=rounds
    )
    if not config.get("secagg-he", True) and config.get("save-model"):  # FedAvg's server holds it
        state = {k: v.numpy() for k, v in result.arrays.to_torch_state_dict().items()}
        np.savez(str(config["save-model"]).format(node="server"), **state)
