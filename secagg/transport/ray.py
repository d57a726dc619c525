"""Ray transport: each client of a round is a Ray actor, on one machine or a cluster.

The round code is the same as in-process (``secagg.rounds``): the driver runs the round loop
and the server's sum, with the server-side cipher only; each client's train, encrypt, decrypt,
apply and evaluate run in an actor that holds the client context (the secret key) and the
user's task. As in-process, a round's clients take their position in the round as their sender
id, and a few actors (one per client of a round, plus client 0 as the evaluator when rounds are
sampled) take on each round's clients' identities: actors grow with the clients per round, not
with the population.

- ``ray_address`` None starts a local Ray (and shuts it down afterwards); an address joins an
  existing cluster (``ray start --head`` on one machine, ``ray start --address ...`` on others).
- Each actor reads the client context (the secret key) itself, from the job's key folder: on a
  cluster of several machines, every node needs ``keys/`` (``client.ctx``, ``manifest.json``)
  at the same path. The driver runs the round loop and the server's sum with the public
  context only: it never reads ``client.ctx``.
- ``client_cpus`` and ``client_gpus`` are each actor's Ray resources (fractional GPUs let several
  clients share one). Torch in each actor uses ``ceil(client_cpus)`` threads, so results do not
  depend on the machine an actor lands on.
- An actor that dies mid-round (its worker was killed, its node lost) is a client that dropped
  out: the round goes on if ``min_clients`` delivered, or fails with the reason and is tried
  again with fresh actors (``round_retries``), exactly as in a network deployment.

Ray is an optional extra (``pip install 'secagg[ray]'``), imported only here.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from secagg.config import RunConfig, TransportSettings
from secagg.crypto import Stamp
from secagg.crypto.masking import Advert, Advertised, MaskRoster, Reveal, SignedKey
from secagg.errors import ConfigError, SecAggError
from secagg.messages import ApplyReply, EvalReply, FitReply, ModelSignature, TrainReply
from secagg.rounds import RoundFailed, sample_clients
from secagg.task import Task


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            "--transport ray needs Ray: pip install 'secagg[ray]' (or pip install ray)"
        ) from err
    return ray


class ClientActor:
    """One client inside a Ray worker: the job's task, its data, the client context."""

    def __init__(
        self, config: RunConfig, task: Task | None, index: int, identities: Any = None
    ) -> None:

        from secagg.builtin import task_for
        from secagg.client import Client, resolve_device, simulated_ciphers, use_threads
        from secagg.task import simulated_site

        use_threads(config)  # as in-process and over gRPC: the same job, the same model
        self.config = config
        self.site_for = simulated_site
        # The client context is read here, in the actor, from the job's key folder (on every
        # node, at the same path): the driver, which sums, never holds the secret key.
        make_cipher = simulated_ciphers(config, identities)

        site = simulated_site(config, index)
        device = resolve_device(config.device)
        self.client = Client(task_for(config, task), site, config, make_cipher, device)

    def signature(self) -> ModelSignature:
        return self.client.signature

    def node(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def become(self, index: int) -> None:
        self.client.become(self.site_for(self.config, index))

    def mask_key(self, job: bytes) -> SignedKey | None:
        return self.client.mask_key(job)

    def advertise(
        self, stamp: Stamp, peers: list[SignedKey | None], nonce: bytes
    ) -> Advertised | None:
        return self.client.advertise(stamp, peers, nonce)

    def train(
        self,
        stamp: Stamp,
        adverts: tuple[Advert | None, ...],
        sealed: dict[int, bytes] | None,
        nonce: bytes,
    ) -> TrainReply:
        return self.client.train(stamp, adverts, sealed, nonce)

    def confirm(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        return self.client.confirm(stamp, survivors)

    def reveal(
        self,
        stamp: Stamp,
        survivors: tuple[int, ...],
        confirmations: dict[int, bytes],
    ) -> Reveal:
        return self.client.reveal(stamp, survivors, confirmations)

    def seal(self, stamp: Stamp, total: int, scales: bytes | None) -> FitReply:
        return self.client.seal(stamp, total, scales)

    def apply(self, payload: bytes, stamp: Stamp, scales: bytes | None) -> ApplyReply:
        return self.client.apply(payload, stamp, scales)

    def evaluate(self, stamp: Stamp, unmasked: bool = False) -> EvalReply | None:
        return self.client.evaluate(stamp, unmasked)

    def averages(self, stamp: Stamp, payload: bytes) -> dict[str, float] | None:
        return self.client.averages(stamp, payload)

    def index(self) -> int:
        return self.client.site.index

    def tensor_sizes(self) -> list[int]:
        return [entry.size for entry in self.client.payload_layout.entries]

    def model_bytes(self) -> bytes:
        return self.client.model_bytes()

    def parameters(self) -> int:
        return sum(p.numel() for p in self.client.model.parameters())


def _local_cpus(settings: TransportSettings, actors: int) -> int:
    return max(os.cpu_count() or 1, math.ceil(actors * settings.client_cpus))


def _check_room(ray: Any, settings: TransportSettings, actors: int) -> None:
    """Refuse a cluster that cannot hold every client of a round at once (they would wait
    for each other forever)."""
    have = ray.cluster_resources()
    needs = {"CPU": actors * settings.client_cpus, "GPU": actors * settings.client_gpus}
    for name, need in needs.items():
        if need > have.get(name, 0.0) + 1e-9:
            flag = "--client-cpus" if name == "CPU" else "--client-gpus"
            raise ConfigError(
                f"the Ray cluster has {have.get(name, 0.0):g} {name}s, the job's {actors} "
                f"clients need {need:g} at once; lower {flag} (fractions are fine) or add nodes"
            )


#: how many times a local Ray is started before its startup error is the run's
LOCAL_STARTS = 4


def _start(ray: Any, settings: TransportSettings, actors: int) -> None:
    """Start (or join) Ray. A local Ray's raylet must register within Ray's fixed 30 s; on a
    loaded machine it sometimes does not, so a local start is tried again (with a warning)
    before it fails the run. Joining a cluster is tried once: its errors are the user's to see.
    """
    # Ray's future default (actors without GPUs see none), taken now: no tip on every run.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if settings.ray_address:
        ray.init(address=settings.ray_address, include_dashboard=False, logging_level="WARNING")
        return
    # A local Ray gets room for every actor: its CPUs are a scheduling budget, and clients
    # that wait for a CPU take turns rather than deadlock the round.
    for attempt in range(1, LOCAL_STARTS + 1):
        try:
            ray.init(
                num_cpus=_local_cpus(settings, actors),
                include_dashboard=False,
                logging_level="WARNING",
            )
            return
        except Exception as err:  # Ray raises a bare Exception for a startup timeout
            ray.shutdown()
            if "timed out during startup" not in str(err):
                raise
            if attempt == LOCAL_STARTS:
                raise ConfigError(
                    f"the local Ray timed out during startup {LOCAL_STARTS} times (its node "
                    "must register within 30 s): stop other work on this machine and run again, "
                    "or use --transport inprocess"
                ) from err
            warnings.warn(
                f"the local Ray did not start in time (attempt {attempt} of {LOCAL_STARTS}); "
                "trying again",
                stacklevel=2,
            )


class RayTransport:
    """The Transport the round loop drives when clients are Ray actors."""

    def __init__(self, config: RunConfig, task: Task | None = None) -> None:
        ray = self.ray = _ray()
        self.roster = config.per_round
        self.sampled = self.roster < config.clients
        actors = self.roster + (1 if self.sampled else 0)
        self.started = not ray.is_initialized()
        if self.started:
            _start(ray, config.transport_settings, actors)
        _check_room(ray, config.transport_settings, actors)
        # Actors on this machine find the keys where the driver was started.
        self.config = replace(config, keys_dir=str(Path(config.keys_dir).resolve()))
        self.task = task
        #: hears nothing yet: Ray's clients run at once, and report when the round ends
        self.on_progress: Any = lambda phase, done, total: None
        #: simulated site keys for the clients' signed mask keys (``masking``)
        self.identities = None
        if config.he and config.masking:
            from secagg.crypto.masking import SimulatedIdentities

            self.identities = ray.put(SimulatedIdentities())
        self.min_clients = config.min_clients or self.roster
        self.actor_class = ray.remote(ClientActor).options(
            num_cpus=config.client_cpus, num_gpus=config.client_gpus, max_restarts=0
        )
        first = sample_clients(config.clients, self.roster, config.seed, 1)
        self.slots: list[Any] = [self._actor(i) for i in first]
        self.evaluator = self._actor(0) if self.sampled else None
        self._check_models()
        self._sizes: list[int] = self._get(self.slots[0].tensor_sizes.remote())
        self._round: list[tuple[int, Any]] = []
        #: the round's sealed self-mask key shares: sender -> recipient -> bytes
        #: the current attempt's keys, as its clients advertised them (None: no masks)
        self._masks: MaskRoster | None = None
        #: the clients of the population this round's slots stand for
        self._chosen: list[int] = first

    def tensor_sizes(self) -> list[int]:
        return self._sizes

    def _actor(self, index: int) -> Any:
        return self.actor_class.remote(self.config, self.task, index, self.identities)

    def _check_models(self) -> None:
        actors = self.slots + ([self.evaluator] if self.evaluator is not None else [])
        signatures = self._get([a.signature.remote() for a in actors])
        indexes = self._get([a.index.remote() for a in actors])
        for index, signature in zip(indexes, signatures, strict=True):
            difference = signatures[0].mismatch(signature)
            if difference is not None:
                raise ConfigError(f"site-{index + 1}'s model is not the job's: {difference}")

    def _get(self, refs: Any) -> Any:
        """ray.get, with the user's own error (a TaskError...) raised as itself."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, SecAggError):
                raise err.cause from None
            raise

    @property
    def parameters(self) -> int:
        return int(self._get(self.slots[0].parameters.remote()))

    def nodes(self) -> set[str]:
        """The Ray nodes the clients run on."""
        return set(self._get([a.node.remote() for a in self.slots]))

    def attempt(self, round_num: int, tries: int) -> bytes:
        return os.urandom(16)  # its clients live in this process: no attempt outlives it

    def train(self, round_stamp: Stamp) -> list[TrainReply]:
        chosen = sample_clients(
            self.config.clients, self.roster, self.config.seed, round_stamp.round_num
        )
        self._replace_dead()
        self._chosen = chosen
        self._get(
            [slot.become.remote(index) for slot, index in zip(self.slots, chosen, strict=True)]
        )
        # Each client's signed job key (made when it first joins the job), relayed to all
        # with the advertise step, then every advert and each one's sealed shares with the
        # train task; none when the clients do not mask.
        keys = self._get([slot.mask_key.remote(round_stamp.job) for slot in self.slots])
        nonce = round_stamp.attempt or os.urandom(16)  # a round tried again masks afresh
        self._masks = None if None in keys else self._advertised(round_stamp, keys, nonce)
        masks = self._masks
        adverts = self.ray.put(() if masks is None else masks.adverts)
        calls = [
            (
                position,
                slot,
                slot.train.remote(
                    round_stamp.for_sender(position),
                    adverts,
                    None if masks is None else masks.sealed_to(position),
                    nonce,
                ),
            )
            for position, slot in enumerate(self.slots)
            if masks is None or masks.adverts[position] is not None
        ]
        replies, alive = [], []
        for position, slot, ref in calls:
            reply = self._survive(ref)
            if reply is not None:
                replies.append(reply)
                alive.append((position, slot))
        self._require(len(replies), round_stamp.round_num, "trained")
        self._round = alive
        return replies

    def _advertised(
        self, round_stamp: Stamp, keys: list[SignedKey | None], nonce: bytes
    ) -> MaskRoster:
        """Every client's keys for the attempt; an actor that died leaves its position out."""
        shared = self.ray.put(keys)
        refs = [
            slot.advertise.remote(round_stamp.for_sender(position), shared, nonce)
            for position, slot in enumerate(self.slots)
        ]
        advertised = [self._survive(ref) for ref in refs]
        policy = self.config.policy()
        return MaskRoster.of(round_stamp.job, nonce, keys, advertised, policy)

    def masks(self, round_num: int) -> MaskRoster | None:
        return self._masks

    def seal(
        self, round_stamp: Stamp, total_samples: int, scales: bytes | None
    ) -> Iterator[FitReply]:
        shared = self.ray.put(scales)
        pending = {
            slot.seal.remote(round_stamp.for_sender(position), total_samples, shared): slot
            for position, slot in self._round
        }
        sealed = 0
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            pending.pop(ready[0])
            reply = self._survive(ready[0])
            if reply is not None:
                sealed += 1
                yield reply
        self._require(sealed, round_stamp.round_num, "sent their update")

    def unmask(self, stamp: Stamp, survivors: tuple[int, ...]) -> list[Reveal]:
        refs = {p: self.slots[p].confirm.remote(stamp.for_sender(p), survivors) for p in survivors}
        signed = {p: s for p, s in ((p, self._survive(r)) for p, r in refs.items()) if s}
        shared = self.ray.put(signed)
        reveals = [
            self.slots[p].reveal.remote(stamp.for_sender(p), survivors, shared) for p in survivors
        ]
        # An actor that died now leaves its reveal out: the server names it.
        return [r for r in (self._survive(ref) for ref in reveals) if r is not None]

    def apply(self, round_stamp: Stamp, payload: bytes, scales: bytes | None) -> list[ApplyReply]:
        shared, shared_scales = self.ray.put(payload), self.ray.put(scales)
        refs = [s.apply.remote(shared, round_stamp, shared_scales) for s in self.slots]
        if self.evaluator is not None:
            self._get(self.evaluator.apply.remote(shared, round_stamp, shared_scales))
        return [r for r in (self._survive(ref) for ref in refs) if r is not None]

    def _evaluating(self) -> list[Any]:
        """As in-process: the evaluator is client 0, which evaluates once, in its slot when
        the round drew it (twice would count its test set twice in the round's averages)."""
        actors = list(self.slots)
        if self.evaluator is not None and 0 not in self._chosen:
            actors.append(self.evaluator)
        return actors

    def evaluators(self, round_num: int) -> int:
        return len(self._evaluating())

    def evaluate(self, stamp: Stamp) -> list[EvalReply]:
        unmasked = stamp.roster != self.roster  # the evaluator holds none of the round's keys
        actors = self._evaluating()
        refs = [a.evaluate.remote(stamp.for_sender(p), unmasked) for p, a in enumerate(actors)]
        replies = (self._survive(ref) for ref in refs)
        return [r for r in replies if r is not None]

    def averages(self, stamp: Stamp, payload: bytes) -> list[dict[str, float]]:
        shared = self.ray.put(payload)
        refs = [a.averages.remote(stamp, shared) for a in self._evaluating()]
        views = (self._survive(ref) for ref in refs)
        return [view for view in views if view is not None]

    def model_bytes(self) -> bytes:
        """The global model (a torch state dict, serialized) as the clients hold it."""
        holder = self.evaluator or self.slots[0]
        return bytes(self._get(holder.model_bytes.remote()))

    def close(self) -> None:
        """Free the actors (and the local Ray this transport started)."""
        for actor in [*self.slots, self.evaluator]:
            if actor is not None:
                self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()

    def _survive(self, ref: Any) -> Any:
        """A call's result, or None when its actor died (a client that dropped out)."""
        try:
            return self._get(ref)
        except self.ray.exceptions.RayActorError:
            return None

    def _replace_dead(self) -> None:
        """Fresh actors for any that died (a retried round starts with every slot alive)."""
        for position, slot in enumerate(self.slots):
            try:
                self.ray.get(slot.index.remote())
            except self.ray.exceptions.RayActorError:
                self.slots[position] = self._actor(0)

    def _require(self, delivered: int, round_num: int, what: str) -> None:
        if delivered < self.min_clients:
            raise RoundFailed(
                f"round {round_num}: only {delivered} client(s) {what}, at least "
                f"{self.min_clients} are needed (Ray actors died)"
            )
