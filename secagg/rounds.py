"""One federated round, top to bottom, and the loop over rounds.

Plaintext and HE runs differ only in the cipher the clients and server were built with (an
integer codec adds the scale exchange of step 2); in-process and networked runs differ only in
the transport.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from math import nan

from secagg.crypto import SERVER, Stamp, contributors
from secagg.errors import SecAggError
from secagg.messages import ApplyReply, EvalReply, FitReply
from secagg.server import Server
from secagg.transport import Transport


@dataclass(frozen=True)
class RoundMetrics:
    """What one round measured. Seconds named ``*_seconds`` are summed over clients."""

    round: int
    clients: int
    accuracy: float
    loss: float
    train_loss: float
    round_seconds: float
    train_seconds: float
    flatten_seconds: float
    #: the scale exchange, client side: encrypting the histogram, decrypting the summed one
    scales_seconds: float
    encrypt_seconds: float
    serialize_seconds: float
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

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class RoundAggregates:
    """What a round leaves behind, encrypted: the summed update and the summed scales that
    decode it (None without a scale exchange). Replaying them rebuilds the global model."""

    update: bytes
    scales: bytes | None


def run_round(
    server: Server,
    transport: Transport,
    round_stamp: Stamp,
    on_aggregate: Callable[[int, RoundAggregates], None] = lambda r, a: None,
) -> tuple[RoundMetrics, RoundAggregates]:
    """One round in the order the data moves; return its metrics and its aggregates.

    ``on_aggregate`` runs once the round's aggregates exist, before any client applies them:
    where the server checkpoints, so that no client is ever ahead of the checkpoint.
    """
    start = time.perf_counter()
    # 1 on every client: train, flatten, weight its update by its share of samples
    scale_payloads = transport.train(round_stamp)
    # 2 integer codecs: the clients agree on quantization steps. Each encrypted how large its
    #   update is, per block; the server adds those histograms without reading them
    scales, scale_sums = None, []
    if scale_payloads:
        scales = server.sum(scale_payloads, round_stamp.scales())
        scale_sums = server.last_sum_each
    up = sum(len(p) for p in scale_payloads)
    # 3 on every client: decrypt the summed scales, quantize on the steps, encrypt; 4 on the
    #   server: add the updates as they arrive, only from clients that took part in step 2
    replies: list[FitReply] = []
    allowed = frozenset(contributors(scales)) if scales is not None else None
    summed = server.sum(
        _payloads(transport.seal(round_stamp, scales), replies), round_stamp, allowed
    )
    aggregates = RoundAggregates(summed, scales)
    on_aggregate(round_stamp.round_num, aggregates)
    # 5-6 on every client: decrypt, check the ledger, dequantize, divide by the total weight,
    #     add to the global model
    applied = transport.apply(round_stamp, summed, scales)
    # 7 the clients evaluate the global model they now hold (the server cannot)
    eval_start = time.perf_counter()
    evals = transport.evaluate(round_stamp.round_num)
    end = time.perf_counter()
    down = len(summed) + (len(scales) if scales is not None else 0)
    metrics = _metrics(
        round_stamp.round_num, replies, applied, evals, (up, down), scale_sums, server.last_sum_each
    )
    metrics = replace(metrics, round_seconds=end - start, evaluate_seconds=end - eval_start)
    return metrics, aggregates


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
            try:
                metrics, _ = run_round(server, transport, stamp, on_aggregate)
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


def _streamed(arrivals: list[float], each: list[float]) -> float:
    """When a server that adds each payload as soon as it arrives is done."""
    done = 0.0
    for arrival, seconds in zip(sorted(arrivals), each, strict=False):
        done = max(done, arrival) + seconds
    return done


def _latency(
    replies: list[FitReply], scale_sums: list[float], sums: list[float], applied: list[ApplyReply]
) -> float:
    """The round's latency in a deployment, where every client works at once on its own
    machine: the last update the server adds, then the slowest client's decrypt and apply."""
    ready = [r.seconds["train"] + r.seconds["flatten"] for r in replies]
    if scale_sums:  # every client waits for the summed scales before it quantizes
        ready = [t + r.seconds["scales_encrypt"] for t, r in zip(ready, replies, strict=True)]
        agreed = _streamed(ready, scale_sums)
        ready = [agreed + r.seconds["scales_decrypt"] for r in replies]
    arrivals = [
        t + r.seconds["encrypt"] + r.seconds["serialize"]
        for t, r in zip(ready, replies, strict=True)
    ]
    slowest_apply = max((a.seconds["decrypt"] + a.seconds["unflatten"] for a in applied), default=0)
    return _streamed(arrivals, sums) + slowest_apply


def _metrics(
    round_num: int,
    replies: list[FitReply],
    applied: list[ApplyReply],
    evals: list[EvalReply],
    wire: tuple[int, int],
    scale_sums: list[float],
    sums: list[float],
) -> RoundMetrics:
    samples = sum(r.num_samples for r in replies)
    eval_n = sum(e.num_samples for e in evals)
    up = wire[0] + sum(r.size for r in replies)
    down = wire[1] * len(applied)

    def total(step: str) -> float:
        return sum(r.seconds.get(step, 0.0) for r in replies)

    return RoundMetrics(
        round=round_num,
        clients=len(replies),
        # No evaluation can come back when every site dropped out after sending its update.
        accuracy=sum(e.accuracy * e.num_samples for e in evals) / eval_n if eval_n else nan,
        loss=sum(e.loss * e.num_samples for e in evals) / eval_n if eval_n else nan,
        train_loss=sum(r.train_loss * r.num_samples for r in replies) / max(samples, 1),
        round_seconds=0.0,
        train_seconds=total("train"),
        flatten_seconds=total("flatten"),
        scales_seconds=total("scales_encrypt") + total("scales_decrypt"),
        encrypt_seconds=total("encrypt"),
        serialize_seconds=total("serialize"),
        aggregate_seconds=sum(scale_sums) + sum(sums),
        decrypt_seconds=sum(a.seconds["decrypt"] for a in applied),
        evaluate_seconds=0.0,
        bytes_up=up,
        bytes_down=down,
        bytes_up_per_client=up / len(replies),
        bytes_down_per_client=down / len(applied) if applied else 0.0,
        latency_seconds=_latency(replies, scale_sums, sums, applied),
        clipped=applied[0].clipped if applied else 0,
    )
