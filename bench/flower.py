"""The Flower example's cost with secagg's HE, with Flower's own SecAgg+, and with neither.

    python bench/flower.py --nodes 8 --rounds 3                  # the example's 2,410 parameters
    python bench/flower.py --nodes 8 --rounds 3 --hidden 4096    # 307,210 parameters

Each variant is the same app (examples/flower: the digits MLP, each node's share of the rows)
in Flower's simulation engine (Ray), in a process of its own, training only (no evaluation
round): ``plain``, Flower's FedAvg (the ClientApp keeps secagg's mod, which passes its messages
through); ``secagg-he``, secagg's HEFedAvg; ``secaggplus``, Flower's SecAgg+ (its legacy
workflow and ``secaggplus_mod``, every node sharing with every other, the reconstruction
threshold secagg's default for the round). Bytes are what the ServerApp sends and receives:
every record of every message, its keys and values (``_record_bytes``), per node and round.
Seconds are the ServerApp's, from its first message to its last, per round (the first round
includes starting the ClientApps). Run from the repository root, with keys in ``keys/``
(``secagg keygen``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("plain", "secagg-he", "secaggplus")


class CountingGrid:
    """A Grid that counts the bytes of every message's records, both ways."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.down = 0
        self.up = 0
        self.first = 0.0
        self.last = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _sent(self, messages: Any) -> list[Any]:
        messages = list(messages)
        self.first = self.first or time.perf_counter()
        self.down += sum(_size(m) for m in messages)
        return messages

    def _received(self, replies: Any) -> list[Any]:
        replies = list(replies)
        self.up += sum(_size(m) for m in replies)
        self.last = time.perf_counter()
        return replies

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        return self._received(self._grid.send_and_receive(self._sent(messages), timeout=timeout))

    def push_messages(self, messages: Any) -> Any:
        return self._grid.push_messages(self._sent(messages))

    def pull_messages(self, message_ids: Any) -> list[Any]:
        return self._received(self._grid.pull_messages(message_ids))


def _size(message: Any) -> int:
    if not message.has_content():
        return 0
    return sum(_record_bytes(record) for record in message.content.values())


def _record_bytes(record: Any) -> int:
    """A record's bytes as Flower counts them: its keys and values (a number 8 bytes); a
    config record counted here, Flower's own count failing on an empty list."""
    from flwr.app import ConfigRecord

    if not isinstance(record, ConfigRecord):
        return int(record.count_bytes())
    total = 0
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        total += len(key) + sum(len(v) if isinstance(v, bytes | str) else 8 for v in values)
    return total


def run_variant(variant: str, nodes: int, rounds: int, hidden: int) -> dict[str, float]:
    """One variant in this process: Flower's simulation engine, the ServerApp's counts."""
    sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "flower")]
    import torch
    from flower_digits import client_app
    from flower_digits.task import Net
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from secagg.crypto.policy import default_threshold
    from secagg.flower import HEFedAvg

    counted: dict[str, CountingGrid] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        counting = counted.setdefault("grid", CountingGrid(grid))
        torch.manual_seed(0)
        arrays = ArrayRecord(Net(hidden).state_dict())
        config = ConfigRecord({"lr": 0.1, "local-epochs": 1, "hidden": hidden})
        if variant == "secaggplus":
            _secaggplus(counting, context, rounds, nodes, default_threshold(nodes), hidden)
            return
        strategy: Any = (
            HEFedAvg(fraction_evaluate=0.0, min_available_nodes=nodes)
            if variant == "secagg-he"
            else FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes)
        )
        strategy.start(grid=counting, initial_arrays=arrays, train_config=config, num_rounds=rounds)

    clients = _secaggplus_client() if variant == "secaggplus" else client_app.app
    run_simulation(
        server,
        clients,
        num_supernodes=nodes,
        backend_config={
            "client_resources": {"num_cpus": 1},
            "init_args": {"include_dashboard": False},
        },
    )
    grid = counted["grid"]
    per = nodes * rounds
    return {
        "bytes_up_per_node_round": grid.up / per,
        "bytes_down_per_node_round": grid.down / per,
        "seconds_per_round": (grid.last - grid.first) / rounds,
    }


def _secaggplus(
    grid: Any, context: Any, rounds: int, nodes: int, threshold: int, hidden: int
) -> None:
    """Flower's SecAgg+ (its legacy workflow), every node sharing with every other."""
    import torch
    from flower_digits.task import Net
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    torch.manual_seed(0)
    initial = [v.numpy() for v in Net(hidden).state_dict().values()]
    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda r: {"server-round": r, "lr": 0.1, "hidden": hidden},
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(num_shares=nodes, reconstruction_threshold=threshold)
    )
    workflow(grid, legacy)


def _secaggplus_client() -> Any:
    """The example's training as a legacy NumPyClient behind Flower's ``secaggplus_mod``."""
    import torch
    from flower_digits.task import Net, load_data, seed_of, train
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod

    class DigitsClient(NumPyClient):  # type: ignore[misc]
        def __init__(self, partition: int, partitions: int) -> None:
            self.partition, self.partitions = partition, partitions

        def fit(self, parameters: Any, config: Any) -> Any:
            net = Net(int(config.get("hidden", 32)))
            keys = list(net.state_dict())
            net.load_state_dict({k: torch.tensor(v) for k, v in zip(keys, parameters, strict=True)})
            trainset, _ = load_data(self.partition, self.partitions)
            seed = seed_of(self.partition, int(config.get("server-round", 0)))
            train(net, trainset, 1, float(config.get("lr", 0.1)), seed)
            weights = [v.numpy() for v in net.state_dict().values()]
            return weights, len(trainset[1]), {}

    def client_fn(context: Any) -> Any:
        config = context.node_config
        return DigitsClient(int(config["partition-id"]), int(config["num-partitions"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32, help="the MLP's hidden units")
    parser.add_argument("--variant", choices=VARIANTS, help="run one, in this process")
    args = parser.parse_args()
    if args.variant:
        result = run_variant(args.variant, args.nodes, args.rounds, args.hidden)
        print("RESULT " + json.dumps(result))
        return
    rows = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant]
        command += ["--nodes", str(args.nodes), "--rounds", str(args.rounds)]
        command += ["--hidden", str(args.hidden)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            print(f"{variant} failed:\n{(done.stdout + done.stderr)[-3000:]}")
            continue
        rows[variant] = json.loads(line[-1].removeprefix("RESULT "))
    size = 64 * args.hidden + args.hidden + args.hidden * 10 + 10
    print(
        f"\nFlower example (digits MLP, {size:,} parameters), {args.nodes} nodes, "
        f"{args.rounds} rounds, training only\n"
    )
    print("| variant | bytes up per node and round | bytes down per node and round | s per round |")
    print("| --- | ---: | ---: | ---: |")
    for variant, row in rows.items():
        print(
            f"| {variant} | {row['bytes_up_per_node_round']:,.0f} | "
            f"{row['bytes_down_per_node_round']:,.0f} | {row['seconds_per_round']:.2f} |"
        )


if __name__ == "__main__":
    main()
