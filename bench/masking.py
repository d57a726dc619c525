"""What pairwise masks cost: bytes and seconds per round, masked vs unmasked HE, same job.

    python bench/masking.py --clients-per-round 8 --rounds 3 --repeats 3
    python bench/masking.py --clients 100 --clients-per-round 100 --rounds 2 --repeats 2
    python bench/masking.py --job jobs/bench_moderate_cnn.toml --rounds 1 --repeats 1

Two parts. **The job**: the built-in digits job in-process, masked and unmasked (alternating
which goes first, after one untimed warm-up round of each), same seed; per-round medians of the
simulated round time, the clients' encrypt seconds, the deployment latency estimate and the
bytes up and down; masked and unmasked rounds must reach the same accuracy (checked). Round
times are dominated by training, which a shared machine makes noisy, so **the crypto** is timed
on its own as well: one client's CKKS work in a round (both phases' encryption and decryption,
the aggregate holding every client's seed), and what masks add to it (advertising the
attempt's keys and sealing its shares, checking the others' signed keys and agreeing a secret
per phase with each, the masks of both phases); the minimum of ``--repeats``
timings each, so other processes on the machine do not count. The CPU seconds of each whole run
(this process's, per round, clients built included; the best run of each mode) hold all of its
CKKS work too: it runs in this process.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the bench package beside secagg

from bench.harness import best  # noqa: E402
from secagg import keys  # noqa: E402
from secagg.config import CkksParams, RunConfig, load_job  # noqa: E402
from secagg.crypto.ckks_server import TAIL  # noqa: E402
from secagg.crypto.packing import PACKED  # noqa: E402
from secagg.job import run_job  # noqa: E402
from secagg.rounds import RoundMetrics  # noqa: E402


def _run(config: RunConfig, masking: bool, out: Path, cpu: list[float]) -> list[RoundMetrics]:
    tag = "m" if masking else "u"
    folder = out / f"{tag}-{len(list(out.iterdir()))}"
    start = time.process_time()
    rounds = run_job(replace(config, masking=masking, output_dir=str(folder))).rounds
    cpu.append((time.process_time() - start) / len(rounds))
    return rounds


def crypto_seconds(
    keys_dir: Path, config: RunConfig, repeats: int
) -> tuple[float, float, float, float]:
    """One client's CKKS seconds in a round of ``config``'s job, what masks add
    to it (key agreement, both phases' double masks), what unmasking adds to it (signing the
    survivor set, checking every survivor's signature, revealing its key), and what the
    server spends removing the round's self-masks."""
    from secagg import quantize
    from secagg.builtin import task_for
    from secagg.crypto import SERVER, Stamp, Update, masking
    from secagg.crypto.ckks import CkksClient
    from secagg.crypto.ckks_server import CkksServer
    from secagg.crypto.masking import Masker, MaskRoster, SimulatedIdentities
    from secagg.flatten import flatten

    per_round = config.per_round
    _, layout = flatten(task_for(config).build_model().state_dict())
    values = {1: quantize.histogram_values(e.size for e in layout.entries), 0: layout.size}
    client = CkksClient(keys.load_for_client(keys_dir))
    server = CkksServer(keys.load_for_server(keys_dir))
    identities = SimulatedIdentities()
    maskers = [Masker(identities.signer, identities.verifier) for _ in range(per_round)]
    stamp = Stamp(bytes(16), 1, SERVER, per_round)
    peers = [m.publish(stamp.job, site) for site, m in enumerate(maskers)]
    shape = client._shape
    total = unmask = removal = 0.0
    rounds = iter(range(2, 10_000))

    def attempt(stamped: Stamp) -> float:
        """Every client advertises and agrees the attempt of ``stamped``'s round; client 0's
        seconds (the others set the round up)."""
        spent = 0.0
        made = []
        for position, masker in enumerate(maskers):
            start = time.perf_counter()
            made.append(masker.advertise(stamped.for_sender(position), peers, b""))
            spent += time.perf_counter() - start if position == 0 else 0.0
        roster = MaskRoster.of(stamped.job, b"", peers, made, None)
        for position, masker in enumerate(maskers):
            start = time.perf_counter()
            masker.agree(
                stamped.for_sender(position), roster.adverts, roster.sealed_to(position), b""
            )
            spent += time.perf_counter() - start if position == 0 else 0.0
        return spent

    extra = min(attempt(replace(stamp, round_num=next(rounds))) for _ in range(repeats))
    for phase, stamped in ((1, stamp.scales()), (0, stamp)):
        update = Update(np.zeros(values[phase]), 1 / per_round)
        payloads = [client.encrypt(update, stamped.for_sender(p)) for p in range(per_round)]
        aggregate = server.sum(payloads, stamped)
        total += best(repeats, lambda s=stamped, u=update: client.encrypt(u, s.for_sender(0)))
        total += best(repeats, lambda s=stamped, a=aggregate: client.decrypt(a, s))
        count = math.ceil(
            PACKED.slots_for(values[phase] + per_round, TAIL) / (shape.poly_modulus_degree // 2)
        )

        masks = []
        for _ in range(repeats):
            # A mask is used once per round and phase: each timing is a new round's.
            fresh = replace(stamped, round_num=next(rounds), sender=0)
            attempt(fresh)
            start = time.perf_counter()
            maskers[0].mask(fresh, count, shape.poly_modulus_degree, shape.modulus)
            masks.append(time.perf_counter() - start)
        extra += min(masks)
        unmask += min(_unmask(maskers, stamped, attempt) for _ in range(repeats))
        revealed = [bytes([p]) * 32 for p in range(per_round)]
        removal += best(
            repeats,
            lambda c=count, k=revealed: masking.MaskPlan((), tuple(k)).words(
                c, shape.poly_modulus_degree, shape.modulus
            ),
        )
    return total, extra, unmask, removal


def _unmask(maskers: list, stamped: object, attempt: Callable[[object], float]) -> float:  # type: ignore[type-arg]
    """One round's consistency round and reveal, as client 0 does them (every client signs;
    client 0 checks every signature and reveals its key and shares): a fresh round each
    time; its seconds, the others' signing included."""
    from secagg.crypto import Stamp

    assert isinstance(stamped, Stamp)
    fresh = replace(stamped, round_num=next(_UNMASK_ROUNDS), sender=0)
    attempt(fresh)
    start = time.perf_counter()
    survivors = tuple(range(len(maskers)))
    signed = {p: m.confirm(fresh.for_sender(p), survivors) for p, m in enumerate(maskers)}
    maskers[0].reveal(fresh.for_sender(0), survivors, signed)
    return time.perf_counter() - start


_UNMASK_ROUNDS = iter(range(20_000, 1_000_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", help="a job file (default: the built-in digits job)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--clients-per-round", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        keys.generate(out / "keys", CkksParams())
        base = load_job(args.job) if args.job else RunConfig(clients=args.clients)
        config = replace(
            base,
            he=True,
            clients_per_round=args.clients_per_round,
            rounds=args.rounds,
            keys_dir=str(out / "keys"),
            tracking=False,
            device="cpu",
        )
        per_round = config.per_round
        (out / "runs").mkdir()
        runs = out / "runs"
        for masking in (False, True):  # warm-up: imports, data, compiled kernels
            _run(replace(config, rounds=1), masking, runs, [])
        results: dict[bool, list[RoundMetrics]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            for masking in order:
                results[masking].extend(_run(config, masking, runs, cpu[masking]))
        crypto, extra, unmask, removal = crypto_seconds(out / "keys", config, max(args.repeats, 5))
    masked, plain = results[True], results[False]
    for m, u in zip(masked, plain, strict=True):
        assert (m.value("accuracy"), m.loss) == (u.value("accuracy"), u.loss), (
            "masks changed the model"
        )

    def median(rows: list[RoundMetrics], name: str) -> float:
        return statistics.median(float(getattr(r, name)) for r in rows)

    print(
        f"{config.job_name} job, {per_round} clients per round of {config.clients}, "
        f"{args.rounds} rounds x "
        f"{args.repeats} repeats; per-round medians"
    )
    print("| figure | unmasked HE | masked HE | masked / unmasked |")
    print("| --- | ---: | ---: | ---: |")
    for name, unit in (
        ("round_seconds", "s"),
        ("encrypt_seconds", "s"),
        ("scales_seconds", "s"),
        ("latency_seconds", "s"),
        ("bytes_up", "B"),
        ("bytes_down", "B"),
    ):
        u, m = median(plain, name), median(masked, name)
        print(f"| {name} ({unit}) | {u:,.3f} | {m:,.3f} | {m / u:.4f} |")
    u, m = min(cpu[False]), min(cpu[True])
    print(
        f"| CPU seconds per round, this process, best run (s) | {u:.3f} | {m:.3f} | {m / u:.4f} |"
    )
    round_per_client = median(plain, "round_seconds") / per_round
    print(
        f"\none client's CKKS work per round: {crypto * 1e3:.1f} ms; "
        f"masks add {extra * 1e3:.2f} ms "
        f"({extra / crypto:.1%} of the CKKS work, {extra / round_per_client:.2%} of a client's "
        f"share of the unmasked round, {round_per_client:.3f} s)"
    )
    print(
        f"unmasking, both phases: {unmask * 1e3:.2f} ms for client 0 with the others' "
        f"signing included (all {per_round} sign, client 0 checks them and reveals; a deployed "
        f"client signs once: {unmask / per_round * 1e3:.2f} ms plus its checks); the server "
        f"removes the {per_round} self-masks in {removal * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
