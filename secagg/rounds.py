"""One federated round, top to bottom, and the loop over rounds.

Plaintext and HE runs differ only in the cipher the clients and server were built with (an
integer codec adds the scale exchange of step 2); in-process and networked runs differ only in
the transport.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from math import nan
from typing import Any

import numpy as np

from secagg import quantize
from secagg.crypto import SERVER, MaskRoster, Reveal, Stamp, contributors, report
from secagg.errors import PayloadError, SecAggError
from secagg.messages import EVAL_LOSS, ApplyReply, FitReply, TrainReply
from secagg.server import Server, Summed
from secagg.transport import Progress, Transport, no_progress


@dataclass(frozen=True)
class RoundMetrics:
    """What one round measured. Seconds named ``*_seconds`` are summed over clients.

    ``metrics`` holds the task's own numbers, each averaged over clients weighted by their
    sample counts: its evaluation metrics by name (``accuracy`` for the built-in tasks, ``auc``,
    ``dice``...) and its training metrics as ``train_<name>``. ``loss`` is the evaluation's
    (NaN when no client evaluated); ``value`` reads any of them by name.
    """

    round: int
    clients: int
    loss: float
    train_loss: float
    round_seconds: float
    train_seconds: float
    flatten_seconds: float
    #: the scale exchange, client side: encrypting how large each update is
    scales_seconds: float
    #: reading the agreed steps, quantizing and encrypting
    encrypt_seconds: float
    #: the server's adding, scale payloads and updates
    aggregate_seconds: float
    decrypt_seconds: float
    evaluate_seconds: float
    #: bytes on the wire, scale exchange included
    bytes_up: int
    bytes_down: int
    bytes_up_per_client: float
    bytes_down_per_client: float
    latency_seconds: float
    #: values the clients' quantization clipped, summed (only a diverged training clips)
    clipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    #: with differential privacy: the job's epsilon so far, at its ``dp_delta``, this round
    #: included (NaN without DP)
    epsilon: float = nan

    def value(self, name: str) -> float:
        """The evaluation's ``loss`` or the task metric ``name`` (NaN when not reported)."""
        return self.loss if name == "loss" else self.metrics.get(name, nan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundMetrics:
        """Inverse of ``to_dict`` (JSON's null is NaN again); fields this release does not
        know are left out, and an older release's ``accuracy`` joins ``metrics``."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {
            key: nan if value is None and known[key] == "float" else value
            for key, value in data.items()
            if key in known
        }
        own: dict[str, Any] = values.get("metrics") or {}
        metrics = {k: nan if v is None else v for k, v in own.items()}
        legacy = data.get("accuracy")
        if isinstance(legacy, float) and legacy == legacy:  # NaN: never reported
            metrics.setdefault("accuracy", legacy)
        return cls(**{**values, "metrics": metrics})


@dataclass(frozen=True)
class RoundAggregates:
    """What a round leaves behind, encrypted: the summed update and the summed scales that
    decode it (None without a scale exchange). Replaying them rebuilds the global model."""

    update: bytes
    scales: bytes | None
    #: the attempt that made them (masked rounds): what a client checks them under
    attempt: bytes = b""


def run_round(
    server: Server,
    transport: Transport,
    round_stamp: Stamp,
    on_aggregate: Callable[[int, RoundAggregates], None] = lambda r, a: None,
    on_progress: Progress = no_progress,
) -> tuple[RoundMetrics, RoundAggregates]:
    """One round in the order the data moves; return its metrics and its aggregates.

    ``on_aggregate`` runs once the round's aggregates exist, before any client applies them:
    where the server checkpoints, so that no client is ever ahead of the checkpoint.
    ``on_progress`` hears the server add each payload (the transport reports the clients).
    """
    start = time.perf_counter()
    server.begin(round_stamp)
    # 1 on every client: the task trains from the global model; the client flattens the model
    #   and keeps its change. An integer codec also encrypts how large the change is, per block
    trained = transport.train(round_stamp)
    total_samples = sum(t.num_samples for t in trained)
    # The job's model, never a payload, says how long every payload of the round is.
    sizes = transport.tensor_sizes()
    # 2 integer codecs: the clients agree on quantization steps; the server adds their
    #   histograms without reading them
    scale_payloads = [t.scales for t in trained if t.scales is not None]
    scales = (
        server.sum(
            _counted(scale_payloads, "scales", on_progress, len(scale_payloads)),
            round_stamp.scales(),
            quantize.histogram_values(sizes),
        )
        if scale_payloads
        else None
    )
    #: each phase's reveals, with the confirmations relayed to every survivor (``masking``)
    unmasking: list[list[Reveal]] = []
    if scales is not None:
        scales = _unmasked(server, transport, round_stamp.scales(), scales, unmasking)
    agreed = scales.payload if scales is not None else None
    # 3 on every client: weight the change by n_i / N, quantize it on the agreed steps and
    #   encrypt it; 4 on the server: add the updates as they arrive, only from clients that
    #   took part so far
    takers = contributors(agreed) if agreed is not None else [t.client_id for t in trained]
    fits: list[FitReply] = []
    sealed = transport.seal(round_stamp, total_samples, agreed)
    added = _counted(_payloads(sealed, fits), "aggregate", on_progress, len(takers))
    summed = server.sum(added, round_stamp, sum(sizes), frozenset(takers))
    # 4b masked payloads: the clients that sent remove their masks with any that did not
    summed = _unmasked(server, transport, round_stamp, summed, unmasking)
    aggregates = RoundAggregates(summed.payload, agreed, round_stamp.attempt)
    on_aggregate(round_stamp.round_num, aggregates)
    # 5 on every client: decrypt, check the ledger, divide by the total weight, add to the
    #   global model
    applied = transport.apply(round_stamp, summed.payload, agreed)
    # 6 the clients evaluate the global model they now hold (the server cannot); an integer
    #   codec encrypts each evaluation, the server adds them, and the clients decrypt the sum
    eval_start = time.perf_counter()
    evaluated = _evaluated(server, transport, round_stamp, unmasking)
    end = time.perf_counter()
    record = RoundRecord(
        trained,
        fits,
        applied,
        evaluated,
        scales,
        summed,
        *_unmasking_bytes(unmasking, transport.masks(round_stamp.round_num)),
    )
    metrics = replace(
        record.metrics(round_stamp.round_num),
        round_seconds=end - start,
        evaluate_seconds=end - eval_start,
    )
    return metrics, aggregates


@dataclass(frozen=True)
class Evaluated:
    """The round's evaluation of its new global model: each metric averaged over the clients
    that evaluated, weighted by their test counts, and what it cost on the wire."""

    metrics: dict[str, float]
    loss: float
    bytes_up: int = 0
    bytes_down: int = 0


def _evaluated(
    server: Server,
    transport: Transport,
    round_stamp: Stamp,
    unmasking: list[list[Reveal]],
) -> Evaluated:
    """The clients' evaluations: averaged here when they came in plain (plaintext FedAvg);
    with an integer codec, added by the server without reading them, then decrypted and
    averaged by the clients, whose answers must agree (``_agreed``). An evaluation that
    cannot be summed leaves the round's metrics unknown, never the round failed: its model
    is already applied. The round's clients mask their evaluations like their updates, and
    unmask the sum the same way (a simulation's extra evaluator, which holds none of the
    round's keys, makes it an unmasked one)."""
    stamp = round_stamp.evaluation(transport.evaluators(round_stamp.round_num))
    evals = transport.evaluate(stamp)
    payloads = [e.payload for e in evals if e.payload]
    if not payloads:
        losses = _averaged([(e.num_samples, {"loss": e.loss}) for e in evals])
        metrics = _averaged([(e.num_samples, e.metrics) for e in evals])
        return Evaluated(metrics, losses.get("loss", nan))
    up = sum(map(len, payloads))
    try:
        summed = server.sum(payloads, stamp, report.VALUES)
        if stamp.roster == round_stamp.roster:
            summed = _unmasked(server, transport, stamp, summed, unmasking)
        views = transport.averages(stamp, summed.payload)
    except (PayloadError, RoundFailed) as err:
        warnings.warn(
            f"round {stamp.round_num}: the clients' evaluations were not averaged: {err}",
            stacklevel=2,
        )
        return Evaluated({}, nan, up)
    agreed = _agreed(views)
    loss = agreed.pop(EVAL_LOSS, nan)
    return Evaluated(agreed, loss, up, len(summed.payload) * len(payloads))


def _unmasking_bytes(phases: list[list[Reveal]], masks: MaskRoster | None) -> tuple[int, int]:
    """Bytes up (each client's advert, commitment and sealed shares; each survivor's
    confirmation, key and shares) and down (every client gets the attempt's adverts and the
    shares sealed to it; every survivor the phase's confirmations) of a round's masks."""
    up = sum(len(r) for reveals in phases for r in reveals)
    down = sum(len(reveals) * sum(len(r.confirmation) for r in reveals) for reveals in phases)
    if masks is not None:
        adverts = sum(len(a) for a in masks.adverts if a is not None)
        up += adverts + sum(len(c) for c in masks.commitments.values())
        up += sum(len(blob) for sealed in masks.sealed.values() for blob in sealed.values())
        down += len(masks.keyed) * adverts
        down += sum(len(blob) for sealed in masks.sealed.values() for blob in sealed.values())
    return up, down


def _unmasked(
    server: Server,
    transport: Transport,
    stamp: Stamp,
    summed: Summed,
    kept: list[list[Reveal]],
) -> Summed:
    """A phase's sum with its masks removed: every contributor added a self-mask and its
    pairs with every advertised neighbour. The contributors confirm the survivor set among
    themselves (each signs it and checks the others' signatures: the consistency round), then
    each reveals its self-mask key and its shares of the keys the server needs (kept in
    ``kept``, for the round's byte count); the server rebuilds what a lost client did not
    reveal and removes the pairs of the advertised positions that sent nothing."""
    masks = transport.masks(stamp.round_num) if server.masking else None
    if masks is None:
        return summed
    survivors = contributors(summed.payload)
    dropped = sorted(masks.keyed - set(survivors))
    reveals = transport.unmask(stamp, survivors)
    kept.append(reveals)
    try:
        return server.correct(summed, reveals, stamp, masks)
    except PayloadError as err:
        # A key that cannot be had leaves the sum masked: the round can only start again
        # (with fresh masks), never go on.
        raise RoundFailed(
            f"round {stamp.round_num}: the contributors' mask reveals (with client(s) "
            f"{dropped} lost) could not unmask the sum: {err}"
        ) from err


def sample_clients(population: int, per_round: int, seed: int, round_num: int) -> list[int]:
    """The clients of the population that take part in round ``round_num``, in order: drawn
    from the job's seed and the round alone, so a resumed run draws the same."""
    if per_round >= population:
        return list(range(population))
    rng = np.random.default_rng([seed, round_num, 0x5A3])
    return sorted(int(i) for i in rng.choice(population, per_round, replace=False))


def round_stamp(job: bytes, round_num: int, roster: int) -> Stamp:
    """The identity of one round of one job, as the server stamps its aggregate."""
    return Stamp(job, round_num, SERVER, roster)


class RoundFailed(SecAggError):
    """A round could not complete (too few clients delivered in time); it may be retried."""


def run(
    server: Server,
    transport: Transport,
    job: bytes,
    rounds: Iterable[int],
    on_round: Callable[[RoundMetrics], None],
    on_aggregate: Callable[[int, RoundAggregates], None] = lambda r, a: None,
    retries: int = 0,
    on_retry: Callable[[int, RoundFailed], None] = lambda r, err: None,
    on_progress: Progress = no_progress,
) -> list[RoundMetrics]:
    """Run ``rounds`` of ``job`` in order; return every round's metrics.

    ``on_aggregate`` sees each round's aggregates before the clients apply them, ``on_round``
    its metrics once it is over. A round that fails with RoundFailed starts again, up to
    ``retries`` times (``on_retry`` hears why).
    """
    history = []
    for round_num in rounds:
        stamp = round_stamp(job, round_num, transport.roster)
        for attempt in itertools.count():
            if server.masking:
                # Each try of a masked round has a nonce of its own, which the clients bind
                # into their masks, shares, confirmations and every contribution's tags.
                stamp = replace(stamp, attempt=transport.attempt(round_num, attempt))
            try:
                metrics, _ = run_round(server, transport, stamp, on_aggregate, on_progress)
                break
            except RoundFailed as err:
                if attempt >= retries:
                    raise
                on_retry(round_num, err)
        on_round(metrics)
        history.append(metrics)
    return history


def _payloads(replies: Iterator[FitReply], keep: list[FitReply]) -> Iterator[bytes]:
    """Hand payloads to the server one by one, keeping only each reply's small metadata."""
    for reply in replies:
        payload, reply.payload = reply.payload, b""
        keep.append(reply)
        yield payload


def _counted(
    payloads: Iterable[bytes], phase: str, on_progress: Progress, total: int
) -> Iterator[bytes]:
    """The payloads as they are; once the server has added each, say how many it has (the
    server times its work between handovers, so reporting here is not counted as adding)."""
    for done, payload in enumerate(payloads, 1):
        yield payload
        on_progress(phase, done, total)


def _streamed(summed: Summed, arrivals: list[float]) -> float:
    """When a server is done that checks each payload as it arrives (each on the thread that
    received it, side by side, as the network server does) and adds them one at a time."""
    checks = summed.checks + [0.0] * max(0, len(arrivals) - len(summed.checks))
    ready = sorted(a + c for a, c in zip(sorted(arrivals), checks, strict=False))
    done = 0.0
    for at, seconds in zip(ready, summed.seconds, strict=False):
        done = max(done, at) + seconds
    return done


@dataclass(frozen=True)
class RoundRecord:
    """Everything the clients and the server reported in one round, for its metrics."""

    trained: list[TrainReply]
    fits: list[FitReply]
    applied: list[ApplyReply]
    evaluated: Evaluated
    scales: Summed | None
    summed: Summed
    #: bytes the clients sent for the masks (``masking``): adverts, sealed shares,
    #: confirmations, self-mask keys and revealed shares
    masks_up: int = 0
    #: bytes the clients received for the masks: the adverts and shares relayed to each, and
    #: every survivor's confirmation, relayed to all
    masks_down: int = 0

    def metrics(self, round_num: int) -> RoundMetrics:
        trained, fits, applied = self.trained, self.fits, self.applied
        sealed = {f.client_id for f in fits}
        senders = [t for t in trained if t.client_id in sealed] or trained
        scale_sums = [*self.scales.seconds, *self.scales.checks] if self.scales else []
        up = sum(len(t.scales or b"") for t in trained) + sum(f.size for f in fits)
        up += self.masks_up
        down = (len(self.summed.payload) + (len(self.scales.payload) if self.scales else 0)) * len(
            applied
        )
        down += self.masks_down
        up += self.evaluated.bytes_up
        down += self.evaluated.bytes_down
        task_metrics = self.evaluated.metrics
        train_metrics = (
            _agreed([f.metrics for f in fits])
            if self.scales is not None
            else _averaged([(t.num_samples, t.metrics) for t in senders])
        )
        return RoundMetrics(
            round=round_num,
            clients=len(fits),
            loss=self.evaluated.loss,
            train_loss=train_metrics.get("loss", nan),
            round_seconds=0.0,
            train_seconds=sum(t.seconds.train for t in trained),
            flatten_seconds=sum(t.seconds.flatten for t in trained),
            scales_seconds=sum(t.seconds.prepare for t in trained),
            encrypt_seconds=sum(f.seconds.encrypt for f in fits),
            aggregate_seconds=sum(scale_sums) + sum(self.summed.seconds) + sum(self.summed.checks),
            decrypt_seconds=sum(a.seconds.decrypt for a in applied),
            evaluate_seconds=0.0,
            bytes_up=up,
            bytes_down=down,
            bytes_up_per_client=up / max(len(fits), 1),
            bytes_down_per_client=down / len(applied) if applied else 0.0,
            latency_seconds=self.latency(),
            clipped=applied[0].clipped if applied else 0,
            metrics={**task_metrics, **{f"train_{k}": v for k, v in train_metrics.items()}},
        )

    def latency(self) -> float:
        """The round's latency in a deployment, where every client works at once on its own
        machine: the last update the server adds, then the slowest client's decrypt and apply."""
        fits = {f.client_id: f for f in self.fits}
        trained = [t for t in self.trained if t.client_id in fits]
        ready = [t.seconds.train + t.seconds.flatten + t.seconds.prepare for t in trained]
        if self.scales is not None:  # every client waits for the summed scales
            agreed = _streamed(self.scales, ready)
            ready = [agreed for _ in trained]
        arrivals = [
            r + fits[t.client_id].seconds.encrypt for r, t in zip(ready, trained, strict=True)
        ]
        slowest = max((a.seconds.decrypt + a.seconds.unflatten for a in self.applied), default=0)
        return _streamed(self.summed, arrivals) + slowest


def _agreed(reports: list[dict[str, float]]) -> dict[str, float]:
    """The averages most clients decrypted from a summed report, name by name (an integer
    codec: every client reads the same sum, each the metrics it reported itself; a client
    that says otherwise is outvoted and logged). Votes compare each value's ``repr``, so NaNs
    (an undefined metric), which are never equal to each other, still agree. Empty when none
    came."""
    votes: dict[str, Counter[str]] = {}
    values: dict[tuple[str, str], float] = {}
    for report_ in reports:
        for name, value in report_.items():
            votes.setdefault(name, Counter())[repr(value)] += 1
            values[name, repr(value)] = value
    agreed, outvoted = {}, 0
    for name, counted in sorted(votes.items()):
        (winner, count), total = counted.most_common(1)[0], sum(counted.values())
        agreed[name] = values[name, winner]
        outvoted = max(outvoted, total - count)
    if outvoted:
        warnings.warn(
            f"{outvoted} of {len(reports)} clients decrypted other metrics than the rest; "
            "the majority's are kept",
            stacklevel=2,
        )
    return agreed


def _averaged(reports: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Each name's average over the reports that have it, weighted by their sample counts."""
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for samples, values in reports:
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value * samples
            weights[name] = weights.get(name, 0) + samples
    return {name: totals[name] / weights[name] for name in totals}
