"""The node side: a Flower client mod that runs secagg's protocol around the user's functions.

``ClientApp(mods=[secagg.flower.he_mod()])`` wraps the user's unchanged ``@app.train`` and
``@app.evaluate``. A message that carries no secagg step passes through untouched, so the same
app runs with Flower's own strategies. For a secagg step the mod is a secagg client
(``secagg.client.Client``): it holds the global model, hands the user's function the model as
Flower would (``content["arrays"]``, the server's ``content["config"]``), takes the trained
arrays and the ``num-examples`` metric back, and answers the server with encrypted payloads.

State between messages. Flower may run each message in another process (a simulation's Ray
actors, a SuperNode's ClientApp process per message), so the node's secagg client is kept in
the node's ``context.state`` (pickled, with the key file and the signing identity left out and
loaded again from the node's key folder), and reused from memory when the same process gets
the node's next message. That state holds the node's mask keys and the global model; it never
leaves the node (Flower keeps a node's context on the node).

Keys never travel in a message: a node reads them from ``keys=`` or its node config's
``secagg-keys``, else the run config's ``secagg-keys`` (a simulation's folder), else
``keys/`` in the working directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from secagg import keys as key_files
from secagg.client import Client
from secagg.config import RunConfig
from secagg.crypto import Identities, RoundPolicy, for_client
from secagg.crypto.certified import CertifiedIdentities
from secagg.crypto.envelope import Stamp
from secagg.crypto.masking import SimulatedIdentities
from secagg.crypto.params import Keys
from secagg.crypto.policy import default_threshold
from secagg.errors import PayloadError, SecAggError, TaskError
from secagg.flower import wire
from secagg.flower.arrays import ArraysModel, as_numpy
from secagg.provision import load_kit
from secagg.task import EvalResult, RoundContext, Site, Task, TrainResult

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]

#: Where a node's secagg client lives in its ``context.state``.
STATE = "secagg.node"
#: The metric a node's train and evaluate replies weigh by (Flower's FedAvg default).
WEIGHT_KEY = "num-examples"
#: The last few nodes' clients this process served, by (run, node), with the digest of the
#: state they were kept as: a process that gets a node's next message skips unpickling it.
#: Only a few: a simulation's actor serves many nodes in turn, and each client holds a model.
_LIVE: OrderedDict[tuple[int, int], tuple[bytes, Client]] = OrderedDict()
_LIVE_KEPT = 4


def he_mod(
    keys: str | Path | None = None,
    threshold: int = 0,
    kit: str | Path | None = None,
    save_model: str | Path | None = None,
) -> Mod:
    """A Flower client mod that takes part in secagg's HE secure aggregation.

    ``kit``: the node's site kit from ``secagg provision`` (else the node config's
    ``secagg-kit``), which gives it its keys, a CA-signed identity that signs its mask keys
    (and checks every peer's) and the round policy the project signed; ``{partition-id}`` and
    other node config names in it are filled in. Without a kit: ``keys``, the node's key
    folder (``secagg keygen``), else as the module says, and ``threshold``, the fewest
    contributors a sum this node unmasks or decrypts may have (else the node config's
    ``secagg-threshold``, else at least ``MIN_THRESHOLD``): the node's, not the server's.

    ``save_model`` (else the node config's ``secagg-save-model``): where the node writes the
    global model after each round, as numpy arrays (``.npz``); ``{node}`` (its node id) and
    node config names in it are filled in. The node's choice, never the server's: a server
    cannot make a node write anywhere."""

    def secagg_mod(
        message: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        step = wire.step_of(message)
        if step is None:
            return call_next(message, context)
        name = str(step.get("step"))
        try:
            local = _local(context, keys, kit)
            answer = _answer(
                name, step, message, context, call_next, local, (threshold, save_model)
            )
        except (SecAggError, ValueError) as err:
            # Named, on one line: the server logs it and counts the node out of the step.
            reason = getattr(err, "reason", "error")
            raise RuntimeError(f"secagg {name} ({reason}): {err}") from None
        return Message(wire.request("reply", answer), reply_to=message)

    return secagg_mod


def _answer(
    step: str,
    record: ConfigRecord,
    message: Message,
    context: Context,
    call_next: Callable[[Message, Context], Message],
    local: _Local,
    settings: tuple[int, str | Path | None],
) -> dict[str, Any]:
    """Do ``step`` with the node's secagg client (made at ``join``, else restored), keep its
    state, and answer; the node's own ``settings``: its threshold and where it saves the
    model."""
    threshold, save_model = settings
    if step == "join":
        floor = threshold or int(context.node_config.get("secagg-threshold", 0))
        client = _join(record, message, local, context, floor)
    else:
        client = _restore(context, local)
    task = client.task
    if not isinstance(task, FlowerTask) or (step != "join" and step not in _STEPS):
        raise PayloadError(f"secagg has no step {step!r}", "malformed")
    task.bind(message, context, call_next)
    try:
        if step == "advertise":
            _learn(task.identities, record)
        answer = _STEPS[step](client, record) if step != "join" else _joined(client, record, local)
    except BaseException:
        # A step that failed half way leaves the object changed and the stored state as it
        # was: the node's next message starts from the stored state.
        _LIVE.pop((context.run_id, context.node_id), None)
        raise
    finally:
        task.unbind()
    _keep(context, client, local)
    if step == "apply":
        _save_model(context, client, save_model)
    return answer


def _key_folder(keys: str | Path | None, context: Context) -> Path:
    for value in (
        keys,
        context.node_config.get("secagg-keys"),
        context.run_config.get("secagg-keys"),
    ):
        if value:
            return Path(str(value))
    return Path("keys")


@dataclass(frozen=True)
class _Local:
    """What a node holds of its own, read afresh for every message: its keys, the identity
    that signs its mask keys, and, with a kit, the project's round policy and its
    certificate."""

    keys: Keys
    identities: Identities
    policy: RoundPolicy | None = None
    certificate: bytes = b""

    @property
    def index(self) -> int | None:
        """The kit's site index in the project's roster (None without a kit)."""
        certified = self.identities
        return certified.own if isinstance(certified, CertifiedIdentities) else None

    @property
    def signing_key(self) -> object:
        """The kit's site key (None without a kit)."""
        certified = self.identities
        if not isinstance(certified, CertifiedIdentities):
            return None
        return certified.signer(certified.own)


def _local(context: Context, keys: str | Path | None, kit: str | Path | None) -> _Local:
    """The node's kit when it names one (``he_mod(kit=...)`` or its node config's
    ``secagg-kit``), else its key folder with identities derived from it."""
    named = kit or context.node_config.get("secagg-kit")
    if named:
        folder = Path(str(named).format_map(dict(context.node_config)))
        site = load_kit(folder, "client")
        identities = CertifiedIdentities(site.roster, site.index, site.private_key, site.ca)
        loaded = key_files.load_for_client(site.folder)
        return _Local(loaded, identities, site.policy(), site.certificate)
    loaded = key_files.load_for_client(_key_folder(keys, context))
    return _Local(loaded, _shared_identities(loaded))


def _shared_identities(loaded: Keys) -> SimulatedIdentities:
    """Without a kit, the nodes' signing keys derive from the key folder they share: they
    sign each mask key, so a server that swaps one is caught (it holds no secret key), but
    every node can derive every node's key: they do not tell one node from another."""
    return SimulatedIdentities(hashlib.sha256(b"secagg flower sites\0" + loaded.context).digest())


def _learn(identities: Identities | None, record: ConfigRecord) -> None:
    """With a kit: the client's identities take each relayed peer certificate, checked
    against the project's CA, before any mask key is used (a server that swaps one is
    named)."""
    if not isinstance(identities, CertifiedIdentities):
        return
    keys = wire.keys_from(record)
    certificates = wire.field(record, "key_certificates", list)
    if len(certificates) != len(keys) or not all(isinstance(c, bytes) for c in certificates):
        raise PayloadError("secagg's relayed certificates are malformed", "malformed")
    for key, certificate in zip(keys, certificates, strict=True):
        if key is not None and key.site != identities.own:
            identities.learn(key.site, certificate)


def _join(
    record: ConfigRecord, message: Message, local: _Local, context: Context, threshold: int
) -> Client:
    """This node's secagg client for the run: the job's shape from the server (its rounds,
    nodes, seed, precision, the bound on a node's count), its model the server's initial
    arrays, its masks signed as site ``site``. What protects the node is the node's own:
    masks always, and the fewest contributors a sum may have (``threshold``, at least
    ``MIN_THRESHOLD`` unless the node lowers it), whatever the server says."""
    values = json.loads(wire.field(record, "job", str))
    if not isinstance(values, dict):
        raise PayloadError("secagg's job settings are not a table", "malformed")
    settings = {k: v for k, v in values.items() if k in wire.JOB_FIELDS}
    try:
        config = replace(RunConfig(), **settings)
    except TypeError as err:
        raise PayloadError(f"secagg's job settings are malformed: {err}", "malformed") from err
    floor = threshold or max(MIN_THRESHOLD, default_threshold(config.per_round))
    config = replace(config, he=True, masking=True, threshold=floor, tracking=False, device="cpu")
    arrays = message.content.get("arrays")
    if not isinstance(arrays, ArrayRecord):
        raise PayloadError("secagg's join step carries no initial arrays", "malformed")
    index = local.index if local.index is not None else wire.field(record, "site", int)
    site = Site(index, f"node-{context.node_id}", config.clients, Path("."))
    policy = local.policy or config.policy()
    make_cipher = for_client(
        True, "", config.precision, local.identities, policy, None, keys=local.keys
    )
    task = FlowerTask(as_numpy(arrays), wire.field(record, "weigh_by", str))
    task.identities = local.identities  # the masks' own: they learn the peers' certificates
    return Client(task, site, config, make_cipher, torch.device("cpu"))


#: The fewest contributors a node lets a sum have unless it sets its own ``threshold``.
MIN_THRESHOLD = 3


def _joined(client: Client, record: ConfigRecord, local: _Local) -> dict[str, Any]:
    key = client.mask_key(bytes(wire.field(record, "job_id", bytes)))
    if key is None:
        raise PayloadError("this node's cipher does not mask", "policy")
    return {**wire.key_fields(key), "certificate": local.certificate}


class _Pickler(pickle.Pickler):
    """Leaves the node's key file and signing key out of its state: they are read again from
    its key folder or kit for every message."""

    def __init__(self, file: io.BytesIO, local: _Local) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._own = local.signing_key

    def persistent_id(self, obj: object) -> str | None:
        if isinstance(obj, Keys):
            return "keys"
        own = self._own
        # The kit's key, loaded afresh for each message: the same key, not the same object.
        same = (
            isinstance(obj, ec.EllipticCurvePrivateKey)
            and isinstance(own, ec.EllipticCurvePrivateKey)
            and obj.private_numbers() == own.private_numbers()
        )
        return "site-key" if same else None


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, local: _Local) -> None:
        super().__init__(io.BytesIO(data))
        self._local = local

    def persistent_load(self, pid: object) -> object:
        if pid == "keys":
            return self._local.keys
        if pid == "site-key" and self._local.signing_key is not None:
            return self._local.signing_key
        raise pickle.UnpicklingError(f"unknown reference {pid!r} in a node's state")


def _keep(context: Context, client: Client, local: _Local) -> None:
    buffer = io.BytesIO()
    _Pickler(buffer, local).dump(client)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).digest()
    context.state[STATE] = ConfigRecord({"client": data, "digest": digest})
    _LIVE[(context.run_id, context.node_id)] = (digest, client)
    _LIVE.move_to_end((context.run_id, context.node_id))
    while len(_LIVE) > _LIVE_KEPT:
        _LIVE.popitem(last=False)


def _restore(context: Context, local: _Local) -> Client:
    record = context.state.get(STATE)
    data = record.get("client") if isinstance(record, ConfigRecord) else None
    if not isinstance(record, ConfigRecord) or not isinstance(data, bytes):
        raise PayloadError(
            "this node holds no secagg state for the run: it did not join it (its state was "
            "lost, or it connected after the run began); start a new run to take part",
            "bad-plan",
        )
    live = _LIVE.get((context.run_id, context.node_id))
    if live is not None and live[0] == record.get("digest"):
        return live[1]
    client = _Unpickler(data, local).load()
    if not isinstance(client, Client):
        raise PayloadError("this node's secagg state is not a client's", "malformed")
    return client


def _stamp(record: ConfigRecord) -> Stamp:
    return Stamp(
        wire.field(record, "job_id", bytes),
        wire.field(record, "round", int),
        wire.field(record, "position", int),
        wire.field(record, "roster", int),
        wire.field(record, "phase", int),
        wire.field(record, "attempt", bytes),
    )


def _advertise(client: Client, record: ConfigRecord) -> dict[str, Any]:
    advertised = client.advertise(
        _stamp(record), wire.keys_from(record), wire.field(record, "attempt", bytes)
    )
    if advertised is None:
        raise PayloadError("this node's cipher does not mask", "policy")
    return wire.advertised_fields(advertised)


def _train(client: Client, record: ConfigRecord) -> dict[str, Any]:
    adverts = wire.adverts_from(record)
    sealed = wire.positions(record, "sealed")
    nonce = wire.field(record, "attempt", bytes)
    return wire.train_fields(client.train(_stamp(record), adverts, sealed, nonce))


def _seal(client: Client, record: ConfigRecord) -> dict[str, Any]:
    scales = wire.field(record, "scales", bytes) or None
    total = wire.field(record, "total", int)
    return wire.fit_fields(client.seal(_stamp(record), total, scales))


def _confirm(client: Client, record: ConfigRecord) -> dict[str, Any]:
    survivors = tuple(wire.field(record, "survivors", list))
    return {"confirmation": client.confirm(_stamp(record), survivors)}


def _reveal(client: Client, record: ConfigRecord) -> dict[str, Any]:
    survivors = tuple(wire.field(record, "survivors", list))
    confirmations = wire.positions(record, "confirmations")
    return wire.reveal_fields(client.reveal(_stamp(record), survivors, confirmations))


def _apply(client: Client, record: ConfigRecord) -> dict[str, Any]:
    scales = wire.field(record, "scales", bytes) or None
    payload = wire.field(record, "payload", bytes)
    return wire.apply_fields(client.apply(payload, _stamp(record), scales))


def _evaluate(client: Client, record: ConfigRecord) -> dict[str, Any]:
    return wire.eval_fields(client.evaluate(_stamp(record)))


def _averages(client: Client, record: ConfigRecord) -> dict[str, Any]:
    averages = client.averages(_stamp(record), wire.field(record, "payload", bytes))
    if averages is None:
        return {"known": False}
    return {"known": True, **wire.metrics_fields(averages)}


_STEPS: dict[str, Callable[[Client, ConfigRecord], dict[str, Any]]] = {
    "advertise": _advertise,
    "train": _train,
    "seal": _seal,
    "confirm": _confirm,
    "reveal": _reveal,
    "apply": _apply,
    "evaluate": _evaluate,
    "averages": _averages,
}


def _save_model(context: Context, client: Client, save_model: str | Path | None) -> None:
    """The global model this node holds, as numpy arrays by name (``.npz``), written whole
    where the node says (``he_mod(save_model=...)`` or its node config's
    ``secagg-save-model``); nothing when it says nothing."""
    from secagg.files import atomic_write

    pattern = save_model or context.node_config.get("secagg-save-model")
    if not pattern:
        return
    path = Path(str(pattern).format_map({**context.node_config, "node": context.node_id}))
    state = {k: v.detach().cpu().numpy() for k, v in client.model.state_dict().items()}
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


class FlowerTask(Task):
    """A secagg task whose training and evaluation are the user's Flower functions, reached
    through the mod's ``call_next`` with the message the server sent."""

    def __init__(self, arrays: Mapping[str, np.ndarray], weigh_by: str = WEIGHT_KEY) -> None:
        self._arrays = dict(arrays)
        self.weigh_by = weigh_by
        self._bound: tuple[Message, Context, Callable[[Message, Context], Message]] | None = None
        #: the identities that sign and check this node's mask keys (set when it joins)
        self.identities: Identities | None = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_arrays": {}, "_bound": None}

    def bind(
        self, message: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> None:
        self._bound = (message, context, call_next)

    def unbind(self) -> None:
        self._bound = None

    def build_model(self) -> nn.Module:
        return ArraysModel(self._arrays)

    def load_data(self, site: Site) -> Any:
        return None  # the user's functions load their own

    def train(self, model: nn.Module, data: Any, ctx: RoundContext) -> TrainResult:
        reply = self._call(model)
        returned = reply.content.get("arrays")
        if not isinstance(returned, ArrayRecord):
            raise TaskError(
                "the ClientApp's train reply holds no 'arrays' record: return "
                "Message(RecordDict({'arrays': ArrayRecord(model.state_dict()), ...}), "
                "reply_to=msg)"
            )
        trained = as_numpy(returned)
        state = model.state_dict()
        if list(trained) != list(state):
            raise TaskError(
                "the ClientApp's train reply holds other arrays than the global model's "
                f"({sorted(set(trained) ^ set(state))[:3]} differ)"
            )
        with torch.no_grad():
            for name, value in trained.items():
                state[name].copy_(torch.from_numpy(np.asarray(value)).reshape(state[name].shape))
        samples, metrics = self._metrics(reply, "train")
        return TrainResult(samples, metrics)

    def evaluate(self, model: nn.Module, data: Any, ctx: RoundContext) -> EvalResult | None:
        reply = self._call(model)
        samples, metrics = self._metrics(reply, "evaluate")
        return EvalResult(math.nan, samples, metrics)

    def _call(self, model: nn.Module) -> Message:
        if self._bound is None:
            raise TaskError("the Flower task was called outside a message")
        message, context, call_next = self._bound
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        arrays = ArrayRecord(torch_state_dict=state)
        config = message.content.get("config")
        content = RecordDict(
            {
                "arrays": arrays,
                "config": config if isinstance(config, ConfigRecord) else ConfigRecord(),
            }
        )
        message.content = content
        reply = call_next(message, context)
        if reply.has_error():
            raise TaskError(f"the ClientApp failed: {reply.error.reason}")
        return reply

    def _metrics(self, reply: Message, what: str) -> tuple[int, dict[str, float]]:
        records = [r for r in reply.content.values() if isinstance(r, MetricRecord)]
        values: dict[str, float] = {}
        for record in records:
            values.update({k: v for k, v in record.items() if isinstance(v, int | float)})
        samples = values.pop(self.weigh_by, None)
        if samples is None or samples != int(samples) or samples < 1:
            raise TaskError(
                f"the ClientApp's {what} reply has no positive whole {self.weigh_by!r} metric "
                "(what FedAvg weighs each node by): put the node's example count in its "
                f"MetricRecord under {self.weigh_by!r}"
            )
        return int(samples), {k: float(v) for k, v in values.items()}


__all__ = ["FlowerTask", "he_mod"]
