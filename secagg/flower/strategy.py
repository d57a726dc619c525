"""The server side: FedAvg's interface on Flower's Message API, with secagg's HE rounds inside.

``HEFedAvg`` replaces ``flwr.serverapp.strategy.FedAvg`` in a ServerApp (the same ``start``).
It runs secagg's own round loop (``secagg.rounds``: the scale exchange, the round policy, the
pairwise masks and their unmasking, the encrypted evaluation) over Flower's ``Grid``
(``GridTransport``), each step a message to the round's nodes, whose ``he_mod`` answers. The
server adds ciphertexts it cannot read: this process loads the public context only and never
imports TenSEAL, and it never holds the model. ``Result.arrays`` is therefore empty: the new
global model lives on the nodes (each writes it where it says: ``he_mod(save_model=...)``).

A node that fails or times out in a step is a dropout, as in secagg's own deployments: the
round goes on over the survivors (their exact average) or fails with a named reason and is
tried again with fresh masks (``round_retries``); a node that missed an aggregate takes no
further part (its model would differ from the others').
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from secagg import rounds
from secagg.config import RunConfig
from secagg.crypto import MaskRoster, Reveal, Stamp, for_server, masking
from secagg.crypto.masking import SignedKey
from secagg.errors import PayloadError
from secagg.files import atomic_write
from secagg.flower import wire
from secagg.flower.arrays import tensor_sizes
from secagg.messages import ApplyReply, EvalReply, FitReply, TrainReply
from secagg.privacy import extra_sizes
from secagg.server import Server

T = TypeVar("T")

_WHOLE_ROUNDS = "HEFedAvg runs whole secagg rounds in start(); it has no per-phase hooks"


class HEFedAvg(Strategy):
    """FedAvg whose sum the server never reads: secagg's CKKS secure aggregation with masks.

    ``keys``: the key folder (``secagg keygen``); this process reads its public
    ``server.ctx`` only. ``weighted_by_key``: the reply metric each node weighs by.
    ``min_train_nodes``: the fewest nodes a round may add (each node also refuses sums of
    fewer than its own threshold: ``he_mod(threshold=...)``). ``checkpoint``: a folder the
    server writes each round's encrypted aggregate to (``round-N.update``, and
    ``round-N.scales``, the summed scale exchange that decodes it), before any node applies
    it: ciphertexts only.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        fraction_evaluate: float = 1.0,
        keys: str | Path = "keys",
        round_retries: int = 2,
        max_node_samples: int = 10**9,
        checkpoint: str | Path = "",
        seed: int = 0,
    ) -> None:
        if not 0 < fraction_train <= 1:
            raise ValueError("fraction_train must be in (0, 1]")
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = max(min_available_nodes, min_train_nodes)
        self.weighted_by_key = weighted_by_key
        self.fraction_evaluate = fraction_evaluate
        self.keys = Path(keys)
        self.round_retries = round_retries
        self.max_node_samples = max_node_samples
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.seed = seed

    def summary(self) -> None:
        log(
            INFO,
            "\t├── secagg HE secure aggregation (CKKS, masks), keys: %s (public context only)",
            self.keys,
        )
        log(
            INFO,
            "\t├── fraction train %.2f, evaluate %.2f",
            self.fraction_train,
            self.fraction_evaluate,
        )
        log(INFO, "\t└── weighted by %r", self.weighted_by_key)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Run ``num_rounds`` of secagg's rounds over the grid's nodes; return their
        aggregate metrics (``arrays`` empty: the server never holds the model)."""
        if evaluate_fn is not None:
            raise ValueError(
                "HEFedAvg has no server-side evaluation: the server never holds the model "
                "(the nodes evaluate it with @app.evaluate)"
            )
        log(INFO, "Starting HEFedAvg (secagg %s rounds)", num_rounds)
        self.summary()
        nodes = _wait_for_nodes(grid, self.min_available_nodes, timeout)
        per_round = max(self.min_train_nodes, math.ceil(self.fraction_train * len(nodes)))
        job = self._job(len(nodes), min(per_round, len(nodes)), num_rounds)
        server = Server(for_server(True, self.keys, job.config.precision), masking=True)
        transport = GridTransport(
            grid,
            nodes,
            initial_arrays,
            job,
            train_config or ConfigRecord(),
            evaluate_config or ConfigRecord(),
            timeout,
            self,
        )
        transport.join()
        result = Result()

        def on_round(metrics: rounds.RoundMetrics) -> None:
            train = {
                k.removeprefix("train_"): v
                for k, v in metrics.metrics.items()
                if k.startswith("train_")
            }
            if not math.isnan(metrics.train_loss):
                train.setdefault("loss", metrics.train_loss)
            evaluated = {k: v for k, v in metrics.metrics.items() if not k.startswith("train_")}
            if not math.isnan(metrics.loss):
                evaluated.setdefault("loss", metrics.loss)
            trained, averaged = _finite(train), _finite(evaluated)
            result.train_metrics_clientapp[metrics.round] = MetricRecord(trained)
            result.evaluate_metrics_clientapp[metrics.round] = MetricRecord(averaged)
            log(
                INFO,
                "[ROUND %s/%s] %s nodes, %.2f s, %.2f MB up; train %s; evaluate %s",
                metrics.round,
                num_rounds,
                metrics.clients,
                metrics.round_seconds,
                metrics.bytes_up / 1e6,
                trained,
                averaged,
            )

        def on_retry(round_num: int, err: rounds.RoundFailed) -> None:
            log(WARNING, "round %s: %s; trying it again with fresh masks", round_num, err)

        rounds.run(
            server,
            transport,
            job.job_id,
            range(1, num_rounds + 1),
            on_round,
            on_aggregate=self._keep,
            retries=self.round_retries,
            on_retry=on_retry,
        )
        return result

    def _keep(self, round_num: int, aggregates: rounds.RoundAggregates) -> None:
        """Write the round's encrypted aggregate to ``checkpoint`` (each file whole)."""
        if self.checkpoint is None:
            return
        self.checkpoint.mkdir(parents=True, exist_ok=True)
        atomic_write(self.checkpoint / f"round-{round_num}.update", aggregates.update)
        if aggregates.scales is not None:
            atomic_write(self.checkpoint / f"round-{round_num}.scales", aggregates.scales)

    def _job(self, nodes: int, per_round: int, num_rounds: int) -> _Job:
        config = RunConfig(
            he=True,
            clients=nodes,
            clients_per_round=per_round,
            rounds=num_rounds,
            seed=self.seed,
            masking=True,
            max_client_samples=self.max_node_samples,
            tracking=False,
        )
        return _Job(config, os.urandom(16))

    # FedAvg's per-phase hooks: HEFedAvg runs whole secagg rounds in ``start``.
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        raise NotImplementedError(_WHOLE_ROUNDS)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise NotImplementedError(_WHOLE_ROUNDS)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        raise NotImplementedError(_WHOLE_ROUNDS)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        raise NotImplementedError(_WHOLE_ROUNDS)


@dataclass(frozen=True)
class _Job:
    """The secagg job a strategy runs: its settings and its id."""

    config: RunConfig
    job_id: bytes

    def fields(self) -> str:
        """The settings a joining node takes from the server (``wire.JOB_FIELDS``), as JSON."""
        values = self.config.to_dict()
        return json.dumps({k: values[k] for k in wire.JOB_FIELDS if values.get(k) is not None})


class GridTransport:
    """secagg's ``Transport`` over Flower's ``Grid``: each step of a round is one message to
    each of the round's nodes (``wire``), answered by their ``he_mod``; a node whose reply is
    an error or does not come in time is left out of the step."""

    def __init__(
        self,
        grid: Grid,
        nodes: list[int],
        arrays: ArrayRecord,
        job: _Job,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        timeout: float,
        strategy: HEFedAvg,
    ) -> None:
        self.grid = grid
        #: the run's nodes, in the order they are asked to join
        self.nodes = list(nodes)
        #: site index -> node id: the site each node signs its mask keys as (a kit's index
        #: in the project's roster, else the order it was asked in)
        self._node_of: dict[int, int] = {}
        self.arrays = arrays
        self.job = job
        self.train_config = train_config
        self.evaluate_config = evaluate_config
        self.timeout = timeout
        self.strategy = strategy
        self.roster = job.config.per_round
        self._sizes = tensor_sizes(arrays)
        self._sizes += extra_sizes(sum(self._sizes), job.config)
        #: site index -> its certificate (empty without kits), relayed with its key
        self._certificates: dict[int, bytes] = {}
        self._keys: dict[int, SignedKey] = {}  # site index -> its signed mask key
        #: sites that missed an aggregate: out of the run (their model would differ)
        self._behind: set[int] = set()
        #: the round's sites by position
        self._round: list[int] = []
        self._trained: list[int] = []
        #: the current attempt as the round's nodes advertised it
        self._masks: MaskRoster | None = None

    def join(self) -> None:
        """Every node builds its secagg client from the initial arrays and the job, and hands
        back its signed mask key."""
        fields = {
            "job": self.job.fields(),
            "job_id": self.job.job_id,
            "weigh_by": self.strategy.weighted_by_key,
        }
        asked = {
            order: wire.request("join", {**fields, "site": order}, arrays=self.arrays)
            for order in range(len(self.nodes))
        }
        joined = self._ask(asked, "train", "join", _joined)
        for order, (key, certificate) in joined.items():
            if key.site in self._keys or key.site < 0:
                log(
                    WARNING,
                    "secagg join: node %s claims site %s, taken",
                    self.nodes[order],
                    key.site,
                )
                continue
            self._keys[key.site] = key
            self._node_of[key.site] = self.nodes[order]
            self._certificates[key.site] = certificate
        if len(self._keys) < self.job.config.per_round:
            raise rounds.RoundFailed(
                f"only {len(self._keys)} of {len(self.nodes)} nodes joined secagg's job; "
                f"{self.job.config.per_round} take part in each round"
            )

    def tensor_sizes(self) -> list[int]:
        return self._sizes

    def attempt(self, round_num: int, tries: int) -> bytes:
        return os.urandom(16)

    def _choose(self, round_num: int) -> list[int]:
        ready = sorted(s for s in self._keys if s not in self._behind)
        if len(ready) < self.roster:
            raise rounds.RoundFailed(
                f"round {round_num}: only {len(ready)} nodes can take part, {self.roster} needed"
            )
        rng = random.Random(f"{self.job.config.seed}:{round_num}")
        return sorted(rng.sample(ready, self.roster))

    def train(self, round_stamp: Stamp) -> list[TrainReply]:
        self._round = self._choose(round_stamp.round_num)
        masks = self._masks = self._advertised(round_stamp)
        relayed = wire.adverts_fields(masks.adverts)
        asked = {
            p: wire.request(
                "train",
                {
                    **_stamp_fields(round_stamp.for_sender(p)),
                    **relayed,
                    **wire.by_position(masks.sealed_to(p), "sealed"),
                },
                config=_with_round(self.train_config, round_stamp.round_num),
            )
            for p in sorted(masks.keyed)
        }
        replies = list(self._ask(asked, "train", "train", wire.train_from).values())
        self._trained = [r.client_id for r in replies]
        self._require(len(replies), round_stamp.round_num, "trained")
        return replies

    def _advertised(self, round_stamp: Stamp) -> MaskRoster:
        """The round's nodes' keys for this attempt, each checked at the door (a node whose
        keys no agreement can use, or that its certificate did not sign, is left out)."""
        keys = [self._keys[site] for site in self._round]
        relayed = {
            **wire.keys_fields(keys),
            "key_certificates": [self._certificates[site] for site in self._round],
        }
        asked = {
            p: wire.request("advertise", {**_stamp_fields(round_stamp.for_sender(p)), **relayed})
            for p in range(self.roster)
        }
        advertised = self._ask(asked, "train", "advertise", wire.advertised_from)
        for position, made in list(advertised.items()):
            site = self._round[position]
            try:
                if made.advert.site != site:
                    raise PayloadError(f"it names site {made.advert.site}", "bad-key")
                masking.check_advert(
                    round_stamp.job,
                    round_stamp.round_num,
                    round_stamp.attempt,
                    made.advert,
                    _certified_key(self._certificates[site]),
                )
            except PayloadError as err:
                node = self._node_of[site]
                log(WARNING, "secagg advertise: node %s is left out of the round: %s", node, err)
                del advertised[position]
        self._require(len(advertised), round_stamp.round_num, "advertised their keys")
        return MaskRoster.of(
            round_stamp.job,
            round_stamp.attempt,
            keys,
            [advertised.get(p) for p in range(self.roster)],
            self.job.config.policy(),
        )

    def seal(
        self, round_stamp: Stamp, total_samples: int, scales: bytes | None
    ) -> Iterator[FitReply]:
        asked = {
            p: wire.request(
                "seal",
                {
                    **_stamp_fields(round_stamp.for_sender(p)),
                    "total": total_samples,
                    "scales": scales or b"",
                },
            )
            for p in self._trained
        }
        answered = self._ask(asked, "train", "seal", wire.fit_from)
        self._require(len(answered), round_stamp.round_num, "sent their update")
        yield from answered.values()

    def masks(self, round_num: int) -> MaskRoster | None:
        return self._masks

    def unmask(self, stamp: Stamp, survivors: tuple[int, ...]) -> list[Reveal]:
        base = {"survivors": list(survivors)}
        asked = {
            p: wire.request("confirm", {**_stamp_fields(stamp.for_sender(p)), **base})
            for p in survivors
        }
        signed = self._ask(asked, "train", "confirm", _confirmation)
        asked = {
            p: wire.request(
                "reveal",
                {
                    **_stamp_fields(stamp.for_sender(p)),
                    **base,
                    **wire.by_position(signed, "confirmations"),
                },
            )
            for p in survivors
        }
        return list(self._ask(asked, "train", "reveal", wire.reveal_from).values())

    def apply(self, round_stamp: Stamp, payload: bytes, scales: bytes | None) -> list[ApplyReply]:
        fields = {**_stamp_fields(round_stamp), "payload": payload, "scales": scales or b""}
        asked = {
            site: wire.request("apply", fields) for site in self._keys if site not in self._behind
        }
        position = {site: p for p, site in enumerate(self._round)}
        answered = self._ask(
            asked, "train", "apply", lambda site, r: wire.apply_from(position.get(site, 0), r)
        )
        self._behind |= set(asked) - set(answered)
        return [reply for site, reply in answered.items() if site in position]

    def evaluators(self, round_num: int) -> int:
        return self.roster

    def evaluate(self, stamp: Stamp) -> list[EvalReply]:
        """The round's nodes that trained evaluate the new model (one that failed its
        training lost its keys for the round with it: its evaluation is corrected for, as
        a dropout's)."""
        if self.strategy.fraction_evaluate <= 0:
            return []
        config = _with_round(self.evaluate_config, stamp.round_num)
        asked = {
            p: wire.request("evaluate", _stamp_fields(stamp.for_sender(p)), config=config)
            for p in self._trained
        }
        replies = self._ask(asked, "evaluate", "evaluate", wire.eval_from).values()
        return [reply for reply in replies if reply is not None]

    def averages(self, stamp: Stamp, payload: bytes) -> list[dict[str, float]]:
        asked = {
            p: wire.request("averages", {**_stamp_fields(stamp.for_sender(p)), "payload": payload})
            for p in range(self.roster)
        }
        answered = self._ask(asked, "train", "averages", _averages).values()
        return [view for view in answered if view is not None]

    def _ask(
        self,
        asked: Mapping[int, Any],
        message_type: str,
        step: str,
        read: Callable[[int, ConfigRecord], T],
    ) -> dict[int, T]:
        """Send each position (or, for ``join`` and ``apply``, each site) its step; return the
        answers that came, each ``read`` (``wire``), by the same key. Errors, silence and
        malformed answers are logged and left out (the node is a dropout), never raised: one
        misbehaving node does not stop the server."""
        node_of = {key: self._node(key, step) for key in asked}
        messages = [
            Message(content=content, dst_node_id=node_of[key], message_type=message_type)
            for key, content in asked.items()
        ]
        back = {node: key for key, node in node_of.items()}
        answered: dict[int, T] = {}
        failed: set[int] = set()
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            key = back.get(reply.metadata.src_node_id)
            if key is None:
                continue
            if reply.has_error():
                failed.add(key)
                why = _reason(reply.error.reason or "no reason given")
                log(WARNING, "secagg %s: node %s: %s", step, reply.metadata.src_node_id, why)
                continue
            record = wire.step_of(reply)
            if record is None:
                log(
                    WARNING,
                    "secagg %s: node %s sent no secagg answer",
                    step,
                    reply.metadata.src_node_id,
                )
                continue
            try:
                answered[key] = read(key, record)
            except PayloadError as err:
                failed.add(key)
                node = reply.metadata.src_node_id
                log(WARNING, "secagg %s: node %s sent a malformed answer: %s", step, node, err)
        for key in set(asked) - set(answered) - failed:
            log(WARNING, "secagg %s: node %s sent nothing in time", step, node_of[key])
        return answered

    def _node(self, key: int, step: str) -> int:
        """The node a step's message goes to: ``key`` is the order it was asked to join in
        (``join``), a site (``apply``), else a position in the round."""
        if step == "join":
            return self.nodes[key]
        return self._node_of[key if step == "apply" else self._round[key]]

    def _require(self, count: int, round_num: int, what: str) -> None:
        least = max(self.strategy.min_train_nodes, 1)
        if count < least:
            raise rounds.RoundFailed(
                f"round {round_num}: only {count} node(s) {what}, {least} needed"
            )


def _joined(order: int, record: ConfigRecord) -> tuple[SignedKey, bytes]:
    """A node's join answer: its signed mask key and its certificate (empty without a kit)."""
    return wire.key_from(record), wire.field(record, "certificate", bytes)


def _certified_key(certificate: bytes) -> ec.EllipticCurvePublicKey | None:
    """The signing key a node's certificate holds (None without kits). The nodes check the
    certificate against the project's CA; the server, which holds no CA, reads the key only
    to leave out a node whose attempt keys it did not sign."""
    if not certificate:
        return None
    try:
        public = x509.load_pem_x509_certificate(certificate).public_key()
    except ValueError as err:
        raise PayloadError("its certificate is not a certificate", "bad-key") from err
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise PayloadError("its certificate holds no ECDSA key", "bad-key")
    return public


def _confirmation(position: int, record: ConfigRecord) -> bytes:
    return bytes(wire.field(record, "confirmation", bytes))


def _averages(position: int, record: ConfigRecord) -> dict[str, float] | None:
    """The averages a node decrypted (None: it evaluated nothing, so it cannot name them)."""
    return wire.metrics_from(record) if record.get("known") is True else None


def _stamp_fields(stamp: Stamp) -> dict[str, Any]:
    return {
        "job_id": stamp.job,
        "round": stamp.round_num,
        "position": stamp.sender,
        "roster": stamp.roster,
        "phase": stamp.phase,
        "attempt": stamp.attempt,
    }


def _reason(text: str) -> str:
    """A node's error in one line: the mod's own message when there is one (Flower wraps it
    in the backend's exception text)."""
    found = re.search(r"secagg \w+ \([^)]*\): .*?(?='>|$)", text, re.MULTILINE)
    return found.group(0) if found else text.strip().splitlines()[-1][:300]


def _with_round(config: ConfigRecord, round_num: int) -> ConfigRecord:
    """The user's config with ``server-round``, as Flower's FedAvg sends it."""
    return ConfigRecord({**config, "server-round": round_num})


def _finite(values: Mapping[str, float]) -> dict[str, Any]:
    return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def _wait_for_nodes(grid: Grid, least: int, timeout: float) -> list[int]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= least:
            return nodes
        if time.monotonic() > deadline:
            raise PayloadError(
                f"only {len(nodes)} Flower nodes connected, {least} needed", "policy"
            )
        time.sleep(1.0)


__all__ = ["GridTransport", "HEFedAvg"]
