"""One client's masking CPU by round size: the full graph at 100, the neighbour graph at 1,000.

    python bench/graph.py                      # 100 and 1,000 clients a round, the digits MLP
    python bench/graph.py --sizes 100,200,201,1000 --rounds 5
    python bench/graph.py --job jobs/bench_moderate_cnn.toml

Every client of a round runs its masking steps (``secagg.crypto.masking``) as a round does:
advertise the attempt's keys and seal its shares of them, check the neighbours' signed attempt
keys and agree a secret per phase with each, open the shares sealed to it, expand both phases'
masks (the scale exchange's and the update's, as many ciphertexts as the job's model needs),
sign the survivor set and reveal (checking the confirmations it needs). Client 0's CPU
seconds for those steps are timed (``time.process_time``; the other clients' work, which sets
the round up, is not counted), in the job's first round (where it also checks the peers'
signed job keys and agrees the secrets that seal shares) and in later rounds (those cached);
the median of ``--rounds`` later rounds is reported. Rounds of more positions than the policy's
``graph_above`` (200) use the neighbour graph, as ``secagg run`` and a deployment do.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from secagg import quantize
from secagg.builtin import task_for
from secagg.config import RunConfig, load_job
from secagg.crypto import SERVER, Stamp, masking
from secagg.crypto.ckks_server import TAIL
from secagg.crypto.masking import Advert, Masker, MaskRoster, SimulatedIdentities
from secagg.crypto.packing import PACKED
from secagg.crypto.policy import RoundPolicy
from secagg.flatten import flatten

#: CKKS ring degree and a 60-bit NTT prime, as the default keys use (the PRG's cost
#: depends on the words drawn, not on the prime)
N, Q = 8192, (1 << 60) - (1 << 18) + 1


@dataclass(frozen=True)
class Row:
    size: int
    graph: bool
    neighbours: int
    first_ms: float
    later_ms: float


def _cpu(step: Callable[[], object]) -> float:
    start = time.process_time()
    step()
    return time.process_time() - start


def _counts(config: RunConfig, size: int) -> dict[int, int]:
    """Ciphertexts per phase (1: the scale exchange, 0: the update) for ``size`` clients."""
    _, layout = flatten(task_for(config).build_model().state_dict())
    values = {1: quantize.histogram_values(e.size for e in layout.entries), 0: layout.size}
    return {
        phase: math.ceil(PACKED.slots_for(count + size, TAIL) / (N // 2))
        for phase, count in values.items()
    }


def one_size(config: RunConfig, size: int, rounds: int) -> Row:
    """Client 0's masking CPU seconds in a round of ``size`` clients, first and later."""
    policy = RoundPolicy.for_round_size(size)
    identities = SimulatedIdentities()
    maskers = [Masker(identities.signer, identities.verifier, policy=policy) for _ in range(size)]
    job = bytes(16)
    peers = [m.publish(job, site) for site, m in enumerate(maskers)]
    counts = _counts(config, size)
    everyone = tuple(range(size))
    times: list[float] = []
    neighbours = 0
    me = maskers[0]
    for round_num in range(1, rounds + 2):
        stamp = Stamp(job, round_num, SERVER, size)
        made: list = [None] * size  # type: ignore[type-arg]
        start = time.process_time()
        made[0] = me.advertise(stamp.for_sender(0), peers, b"")
        cpu = time.process_time() - start
        around = sorted(me._attempts[(job, round_num, b"")].around)
        neighbours = len(around)
        # The neighbours set the round up (untimed): their keys, shares and signatures; the
        # other positions' adverts, which client 0 does not read, are placeholders.
        for p in around:
            made[p] = maskers[p].advertise(stamp.for_sender(p), peers, b"")
        roster = MaskRoster.of(job, b"", peers, made, policy)
        adverts = [
            a if a is not None else Advert(p, bytes(96), bytes(64))
            for p, a in enumerate(roster.adverts)
        ]
        sealed = roster.sealed_to(0)
        cpu += _cpu(lambda s=stamp, a=adverts, b=sealed: me.agree(s.for_sender(0), a, b, b""))
        for phase in (stamp.scales(), stamp):
            cpu += _cpu(lambda s=phase: me.mask(s.for_sender(0), counts[s.phase], N, Q))
            cpu += _cpu(lambda s=phase: me.confirm(s.for_sender(0), everyone))
            # The neighbours' confirmations: their site keys' signatures of the same set.
            message = me._confirmation(phase.for_sender(0), everyone)
            signed = {p: masking._signature(identities.signer(p), message) for p in around}
            cpu += _cpu(lambda s=phase, g=signed: me.reveal(s.for_sender(0), everyone, g))
        times.append(cpu)
    later = statistics.median(times[1:])
    return Row(size, policy.graph(size), neighbours, times[0] * 1e3, later * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", help="a job file (default: the built-in digits job)")
    parser.add_argument("--sizes", default="100,1000", help="clients a round, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="later rounds timed (median)")
    args = parser.parse_args()
    config = load_job(args.job) if args.job else RunConfig()
    one_size(config, 4, 1)  # untimed: compiles the PRG's kernels (numba) once
    rows = [one_size(config, int(size), args.rounds) for size in args.sizes.split(",")]
    base = rows[0]
    print(f"{config.job_name} job: client 0's masking CPU per round (ms), {args.rounds} rounds")
    print(
        "| clients a round | graph | neighbours | first round | later rounds (median) "
        "| later / first size's |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        kind = "neighbour graph" if row.graph else "full"
        print(
            f"| {row.size:,} | {kind} | {row.neighbours} | {row.first_ms:.1f} | "
            f"{row.later_ms:.1f} | {row.later_ms / base.later_ms:.2f} |"
        )


if __name__ == "__main__":
    main()
