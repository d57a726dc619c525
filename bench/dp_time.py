"""What distributed DP costs in time: the same HE job with and without it, alternating.

    python bench/dp_time.py --clients 8 --rounds 10 --runs 4
    python bench/dp_time.py --clients 100 --rounds 3 --runs 3

Each run is the built-in digits job in one process with HE and masks, without DP and then with
DP calibrated to ``--epsilon`` (clip ``--clip``), ``--runs`` times, alternating, after one
untimed warm-up. Printed per figure: the median over every round of each mode, and DP's cost
as the median of the runs' ratios (each DP run over the run without DP before it, each run's
own median over its rounds) with a bootstrap 95 % interval over the runs: the simulated round
time, the deployment latency estimate, the process's CPU seconds a round (every thread: the
noise sampler draws in the background), the clients' summed encrypt seconds and the bytes up.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secagg.config import RunConfig

FIGURES = ("round_seconds", "latency_seconds", "cpu_seconds", "encrypt_seconds", "bytes_up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--keys", default="keys", help="HE keys (secagg keygen's folder)")
    args = parser.parse_args()
    from secagg.job import run_job

    warnings.simplefilter("ignore")  # the partition's notes, once per run
    base = RunConfig(
        he=True,
        clients=args.clients,
        rounds=args.rounds,
        dp_clip=args.clip,
        tracking=False,
        keys_dir=args.keys,
        device="cpu",
    )
    # figures[mode][name]: one list of per-round values per run
    figures: dict[str, dict[str, list[list[float]]]] = {"no DP": {}, "DP": {}}
    with tempfile.TemporaryDirectory() as out:
        run_job(replace(base, rounds=1, output_dir=f"{out}/warm-up"))
        for run in range(args.runs):
            for mode, epsilon in (("no DP", 0.0), ("DP", args.epsilon)):
                config = replace(base, dp_epsilon=epsilon, output_dir=f"{out}/{mode}-{run}")
                cpu = time.process_time()
                rounds = run_job(config).rounds
                cpu = (time.process_time() - cpu) / len(rounds)
                for name in FIGURES:
                    values = [cpu if name == "cpu_seconds" else getattr(m, name) for m in rounds]
                    figures[mode].setdefault(name, []).append(values)
    print(
        f"digits MLP, HE with masks, {args.clients} clients, {args.runs} runs x {args.rounds} "
        f"rounds a mode, alternating; DP: epsilon {args.epsilon}, clip {args.clip}"
    )
    print("| figure (medians) | no DP | DP | DP / no DP: the runs' median ratio (95 % interval) |")
    print("| --- | ---: | ---: | ---: |")
    for name in FIGURES:
        plain, dp = figures["no DP"][name], figures["DP"][name]
        ratio, low, high = _ratio(plain, dp)
        print(
            f"| {name} | {_median(plain):,.4f} | {_median(dp):,.4f} | "
            f"{ratio:.3f} ({low:.3f}-{high:.3f}) |"
        )


def _median(runs: list[list[float]]) -> float:
    return statistics.median(value for run in runs for value in run)


def _ratio(plain: list[list[float]], dp: list[list[float]]) -> tuple[float, float, float]:
    """The median over run pairs of DP's run median over the plain run's, with a bootstrap
    95 % interval (resampling the pairs, a fixed seed: the same output for the same runs)."""
    ratios = [
        statistics.median(d) / statistics.median(p) if statistics.median(p) else 1.0
        for p, d in zip(plain, dp, strict=True)
    ]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return statistics.median(ratios), medians[50], medians[1949]


if __name__ == "__main__":
    main()
