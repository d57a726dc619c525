"""secagg's HE for Flower apps (``secagg.flower``), run in Flower's own simulation engine (Ray):
the example app with HEFedAvg against the same app with Flower's FedAvg, one node failing its
training, four nodes, real ClientApp processes (Ray actors)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parent.parent


def _simulate(mode: str, work: Path, kits: Path) -> tuple[str, dict[str, object]]:
    """Run tests/flower_sim.py (one round, the node of partition 3 failing its training, each
    node with its kit); return its output and its report of the ServerApp's process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    script = str(ROOT / "tests" / "flower_sim.py")
    done = subprocess.run(
        [sys.executable, script, mode, str(work), "1", "1", str(kits)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return out, report


def _model(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


def _fedavg_without_node_3() -> dict[str, np.ndarray]:
    """What Flower's FedAvg makes of round 1 when the node of partition 3 fails: the three
    others' models trained by the example's own code, averaged weighted by their rows."""
    import torch

    sys.path.insert(0, str(ROOT / "examples" / "flower"))
    from flower_digits.task import Net, load_data, seed_of, train

    torch.manual_seed(0)  # as the example's ServerApp seeds its initial model
    initial = Net().state_dict()
    total: dict[str, np.ndarray] = {}
    rows = 0
    for partition in (0, 1, 2):
        net = Net()
        net.load_state_dict(initial)
        trainset, _ = load_data(partition, 4)
        train(net, trainset, 1, 0.1, seed_of(partition, 1))
        n = len(trainset[1])
        for name, value in net.state_dict().items():
            total[name] = total.get(name, 0) + value.double().numpy() * n
        rows += n
    return {name: value / rows for name, value in total.items()}


def test_a_flower_app_gets_he_with_one_line_each_side_and_the_same_model(tmp_path: Path) -> None:
    """The example app with secagg's mod and HEFedAvg, four nodes each with its site kit
    (``secagg provision``: a CA-signed identity signs its mask keys, the project's round
    policy), one of which fails its training: the round goes on over the three others, and
    every node ends with FedAvg's model of them (within the codec's precision), the same on
    every node; the ServerApp's process never imports or maps TenSEAL and never reads a
    secret key."""
    from secagg.provision import provision

    kits = tmp_path / "kits"
    provision(kits, "127.0.0.1:9", [f"site-{i}" for i in range(4)])
    out, report = _simulate("he", tmp_path, kits)
    assert report == {"tenseal_imported": False, "tenseal_mapped": False, "secret_reads": []}
    # The failure is a dropout, named, and the round adds the three others.
    assert re.search(r"secagg train: node \d+: secagg train \(error\): .*fails its training", out)
    assert re.search(r"\[ROUND 1/1\] 3 nodes", out), out[-3000:]
    nodes = sorted(tmp_path.glob("he-*.npz"))
    assert len(nodes) == 4  # the failed node applied the round too
    first = _model(nodes[0])
    for path in nodes[1:]:
        assert all(np.array_equal(first[k], v) for k, v in _model(path).items()), path
    expected = _fedavg_without_node_3()
    assert first.keys() == expected.keys()
    gap = max(float(np.abs(first[k] - expected[k]).max()) for k in expected)
    assert gap < 1e-4, gap  # quantized on secagg's steps: close, not bit for bit
    # The server checkpointed the round's sum as it holds it: ciphertexts, no model.
    update = (tmp_path / "checkpoint" / "round-1.update").read_bytes()
    assert len(update) > 10_000 and (tmp_path / "checkpoint" / "round-1.scales").exists()
    assert update.startswith(b"SAGG")  # secagg's aggregate envelope (envelope.MAGIC)


def test_the_mod_passes_flowers_own_messages_through() -> None:
    """A message with no secagg step (Flower's FedAvg, say) reaches the user's function as
    it came, and its reply goes back untouched: the same ClientApp runs under any strategy."""
    from flwr.app import Context, Message, Metadata, RecordDict

    from secagg.flower import he_mod

    metadata = Metadata(1, "m1", 0, 1, "", "", 0.0, 60.0, "train")
    message = Message(metadata=metadata, content=RecordDict())
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = Message(metadata=metadata, content=RecordDict())
    seen: list[Message] = []

    def user(msg: Message, ctx: Context) -> Message:
        seen.append(msg)
        return reply

    assert he_mod()(message, context, user) is reply
    assert seen == [message] and not context.state


def test_a_nodes_kept_state_holds_no_key_and_resumes_the_round(session_keys: Path) -> None:
    """What a node keeps in Flower's context between messages: its secagg client pickled
    without the key file (read again from the key folder), which goes on where it stopped:
    restored after training, it confirms the round's survivors with the keys it agreed."""
    import io

    from secagg import keys
    from secagg.builtin import task_for
    from secagg.config import RunConfig
    from secagg.crypto.envelope import Stamp
    from secagg.crypto.masking import MaskRoster
    from secagg.flower import node
    from secagg.job import build_clients

    config = RunConfig(he=True, clients=3, keys_dir=str(session_keys), tracking=False)
    clients = build_clients(config, task_for(config))
    stamp = Stamp(bytes(16), 1, 0, 3)
    peers = [c.mask_key(stamp.job) for c in clients]
    nonce = b"n" * 16
    made = [c.advertise(stamp.for_sender(p), peers, nonce) for p, c in enumerate(clients)]
    roster = MaskRoster.of(stamp.job, nonce, peers, made, config.policy())
    replies = [
        c.train(stamp.for_sender(p), roster.adverts, roster.sealed_to(p), nonce)
        for p, c in enumerate(clients)
    ]
    loaded = keys.load_for_client(session_keys)
    buffer = io.BytesIO()
    local = node._Local(loaded, clients[0].cipher.inner.masker._signer.__self__)
    node._Pickler(buffer, local).dump(clients[0])
    blob = buffer.getvalue()
    assert loaded.context[1000:1064] not in blob  # no slice of the secret context
    restored = node._Unpickler(blob, local).load()
    assert restored.cipher.inner._keys is loaded
    assert replies[0].scales and made[0] is not None and made[0].sealed  # shared and trained
    # The restored client signs the scale exchange's survivors from its own kept state.
    signature = restored.confirm(stamp.scales().for_sender(0), (0, 1, 2))
    assert len(signature) == 64


def test_a_node_with_a_kit_refuses_a_certificate_the_server_swapped(tmp_path: Path) -> None:
    """With kits, each node signs its mask key with its CA-signed site key and checks every
    peer's certificate against the project's CA before using its key: a server that relays
    another project's certificate (one it made) in a node's place is refused, by name."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from secagg.crypto.masking import SignedKey
    from secagg.errors import PayloadError
    from secagg.flower import node, wire
    from secagg.provision import provision

    ours = provision(tmp_path / "ours", "127.0.0.1:9", ["site-0", "site-1", "site-2"])
    theirs = provision(tmp_path / "theirs", "127.0.0.1:9", ["site-0", "site-1", "site-2"])
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    local = node._local(context, None, ours["site-0"])
    keys = [SignedKey(i, bytes(32), bytes(64)) for i in range(3)]
    honest = [(ours[f"site-{i}"] / "client.pem").read_bytes() for i in range(3)]
    record = ConfigRecord({**wire.keys_fields(keys), "key_certificates": honest})
    node._learn(local.identities, record)  # the project's own: taken
    swapped = [*honest[:2], (theirs["site-2"] / "client.pem").read_bytes()]
    record = ConfigRecord({**wire.keys_fields(keys), "key_certificates": swapped})
    with pytest.raises(PayloadError, match="site-2's relayed certificate is not signed by this"):
        node._learn(local.identities, record)


def test_a_node_that_answers_malformed_is_a_dropout_not_a_dead_server(monkeypatch) -> None:
    """One node's answer with a mistyped field (a hostile or broken node) is logged and left
    out of the step, like a node that did not answer; the ServerApp goes on with the others."""
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from secagg.flower import wire
    from secagg.flower.strategy import GridTransport

    for name in ("_run_id", "_node_id", "_task_id"):  # as inside a run: messages name them
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)

    def reply(node: int, samples: object) -> Message:
        metadata = Metadata(1, f"m{node}", node, 0, "", "", 0.0, 60.0, "train")
        fields = {"samples": samples, "scales": b"", "commitment": b""}
        return Message(metadata=metadata, content=RecordDict({"secagg": ConfigRecord(fields)}))

    class Grid:
        def send_and_receive(self, messages, timeout=None):  # type: ignore[no-untyped-def]
            return [reply(11, 5), reply(12, "five")]  # node 12's count is not a number

    transport = GridTransport.__new__(GridTransport)
    transport.grid, transport.timeout, transport._round = Grid(), 1.0, [0, 1]
    transport._node_of = {0: 11, 1: 12}
    answered = transport._ask({0: RecordDict(), 1: RecordDict()}, "train", "train", wire.train_from)
    assert list(answered) == [0] and answered[0].num_samples == 5
