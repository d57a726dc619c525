"""One federated round, top to bottom, and the loop over rounds.

Plaintext and HE runs differ only in the cipher the clients and server were built with;
in-process and networked runs differ only in the transport.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace

from secagg.client import ApplyReply, EvalReply, FitReply
from secagg.crypto import SERVER, Stamp
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
    encrypt_seconds: float
    serialize_seconds: float
    aggregate_seconds: float
    decrypt_seconds: float
    evaluate_seconds: float
    bytes_up: int
    bytes_down: int
    bytes_up_per_client: float
    bytes_down_per_client: float
    latency_seconds: float
    #: values the clients' quantization clipped, summed (integer codecs; 0 for float)
    clipped: int = 0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def run_round(
    server: Server, transport: Transport, round_stamp: Stamp
) -> tuple[RoundMetrics, bytes]:
    """One round in the order the data moves; return its metrics and the summed payload."""
    start = time.perf_counter()
    # 1-3 on every client: train, flatten, weight its update by its share of samples,
    #     quantize (integer codecs), encrypt it with its ledger entries
    replies: list[FitReply] = []
    # 4 on the server: add ciphertexts as they arrive; it holds no secret key
    summed = server.sum(_payloads(transport.fit(round_stamp), replies), round_stamp)
    # 5-6 on every client: decrypt, check the ledger, divide by the total weight, apply
    applied = transport.apply(round_stamp, summed)
    # 7 the clients evaluate the global model they now hold (the server cannot)
    eval_start = time.perf_counter()
    evals = transport.evaluate(round_stamp.round_num)
    end = time.perf_counter()
    metrics = _metrics(round_stamp.round_num, replies, summed, applied, evals, server.last_sum_each)
    return replace(metrics, round_seconds=end - start, evaluate_seconds=end - eval_start), summed


def round_stamp(job: bytes, round_num: int, roster: int) -> Stamp:
    """The identity of one round of one job, as the server stamps its aggregate."""
    return Stamp(job, round_num, SERVER, roster)


def run(
    server: Server,
    transport: Transport,
    job: bytes,
    rounds: Iterable[int],
    on_round: Callable[[RoundMetrics, bytes], None],
) -> list[RoundMetrics]:
    """Run ``rounds`` of ``job`` in order, calling ``on_round`` after each; return every
    round's metrics."""
    history = []
    for round_num in rounds:
        metrics, summed = run_round(
            server, transport, round_stamp(job, round_num, transport.roster)
        )
        on_round(metrics, summed)
        history.append(metrics)
    return history


def _payloads(replies: Iterator[FitReply], keep: list[FitReply]) -> Iterator[bytes]:
    """Hand payloads to the server one by one, keeping only each reply's small metadata."""
    for reply in replies:
        payload, reply.payload = reply.payload, b""
        keep.append(reply)
        yield payload


def _server_done(replies: list[FitReply], sum_each: list[float]) -> float:
    """When the server would finish summing in a deployment: every client trains and encrypts
    at once on its own machine, and the server adds each payload as soon as it arrives."""
    arrivals = sorted(sum(r.seconds.values()) for r in replies)
    done = 0.0
    for arrival, seconds in zip(arrivals, sum_each, strict=False):
        done = max(done, arrival) + seconds
    return done


def _metrics(
    round_num: int,
    replies: list[FitReply],
    summed: bytes,
    applied: list[ApplyReply],
    evals: list[EvalReply],
    sum_each: list[float],
) -> RoundMetrics:
    samples = sum(r.num_samples for r in replies)
    eval_n = sum(e.num_samples for e in evals) or 1
    up = sum(r.size for r in replies)
    down = len(summed) * len(applied)
    aggregate_seconds = sum(sum_each)
    slowest_apply = max(a.seconds["decrypt"] + a.seconds["unflatten"] for a in applied)
    return RoundMetrics(
        round=round_num,
        clients=len(replies),
        accuracy=sum(e.accuracy * e.num_samples for e in evals) / eval_n,
        loss=sum(e.loss * e.num_samples for e in evals) / eval_n,
        train_loss=sum(r.train_loss * r.num_samples for r in replies) / max(samples, 1),
        round_seconds=0.0,
        train_seconds=sum(r.seconds["train"] for r in replies),
        flatten_seconds=sum(r.seconds["flatten"] for r in replies),
        encrypt_seconds=sum(r.seconds["encrypt"] for r in replies),
        serialize_seconds=sum(r.seconds["serialize"] for r in replies),
        aggregate_seconds=aggregate_seconds,
        decrypt_seconds=sum(a.seconds["decrypt"] for a in applied),
        evaluate_seconds=0.0,
        bytes_up=up,
        bytes_down=down,
        bytes_up_per_client=up / len(replies),
        bytes_down_per_client=down / len(applied),
        latency_seconds=_server_done(replies, sum_each) + slowest_apply,
        clipped=applied[0].clipped,
    )
