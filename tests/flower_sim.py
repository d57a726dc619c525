"""Runs examples/flower in Flower's simulation engine (Ray), for tests/test_flower.py.

    python tests/flower_sim.py MODE OUT ROUNDS [FAIL_ROUND [KITS]]

MODE ``he``: the ServerApp runs secagg's HEFedAvg; ``plain``: Flower's FedAvg, the ClientApp
keeping secagg's mod (which passes Flower's own messages through). Four nodes; with FAIL_ROUND
the node of partition 3 fails its training in that round. With KITS (``secagg provision``'s
folder: a kit per site ``site-<partition>`` and the server's), each node takes its keys,
identity and round policy from its kit, and the ServerApp its public key from the server's.
Each node (``he``, where its mod says) or the server (``plain``) writes the global model to
OUT; the last line printed is a JSON report of what the ServerApp's process loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "flower")]

from flower_digits import client_app, server_app  # noqa: E402
from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from secagg import keys  # noqa: E402
from secagg.flower import he_mod  # noqa: E402


def main() -> None:
    mode, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fail_round = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    kits = sys.argv[5] if len(sys.argv) > 5 else ""
    secret_reads: list[str] = []
    load = keys.load_for_client

    def watched(folder):  # type: ignore[no-untyped-def]
        secret_reads.append(str(folder))  # the ServerApp's process: must never happen
        return load(folder)

    keys.load_for_client = watched  # type: ignore[assignment]
    kit = f"{kits}/site-{{partition-id}}" if kits else None
    clients = ClientApp(mods=[he_mod(kit=kit, save_model=f"{out}/{mode}-{{node}}.npz")])

    @clients.train()
    def train(msg: Message, context: Context) -> Message:
        round_num = int(msg.content["config"].get("server-round", 0))
        if round_num == fail_round and int(context.node_config["partition-id"]) == 3:
            raise RuntimeError("this node fails its training (the test's fault)")
        return client_app.train_fn(msg, context)

    clients.evaluate()(client_app.evaluate_fn)
    server = ServerApp()

    @server.main()
    def run(grid: Grid, context: Context) -> None:
        keys_folder = f"{kits}/server" if kits else "keys"
        settings = {
            "secagg-he": mode == "he",
            "num-server-rounds": rounds,
            "secagg-keys": keys_folder,
        }
        saved = {"save-model": f"{out}/{mode}-{{node}}.npz", "checkpoint": f"{out}/checkpoint"}
        server_app.run(grid, {**settings, **saved})

    run_simulation(
        server,
        clients,
        num_supernodes=4,
        backend_config={
            "client_resources": {"num_cpus": 1},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    maps = Path("/proc/self/maps").read_text()
    report = {
        "tenseal_imported": "tenseal" in sys.modules,
        "tenseal_mapped": "tenseal" in maps.lower(),
        "secret_reads": secret_reads,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
