"""What distributed DP costs in time: the same HE job with and without it, alternating.

    python bench/dp_time.py --clients 8 --rounds 10 --runs 4
    python bench/dp_time.py --clients 100 --rounds 3 --runs 3

Each run is the built-in digits job in one process with HE and masks, without DP and then with
DP calibrated to ``--epsilon`` (clip ``--clip``), ``--runs`` times, alternating, after one
untimed warm-up; printed are the medians over every round of each mode: the simulated round
time, the deployment latency estimate, the clients' summed encrypt seconds and the bytes up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secagg.config import RunConfig

FIGURES = ("round_seconds", "latency_seconds", "encrypt_seconds", "bytes_up")


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
    figures: dict[str, dict[str, list[float]]] = {"no DP": {}, "DP": {}}
    with tempfile.TemporaryDirectory() as out:
        run_job(replace(base, rounds=1, output_dir=f"{out}/warm-up"))
        for run in range(args.runs):
            for mode, epsilon in (("no DP", 0.0), ("DP", args.epsilon)):
                config = replace(base, dp_epsilon=epsilon, output_dir=f"{out}/{mode}-{run}")
                for metrics in run_job(config).rounds:
                    for name in FIGURES:
                        figures[mode].setdefault(name, []).append(getattr(metrics, name))
    print(
        f"digits MLP, HE with masks, {args.clients} clients, {args.runs} runs x {args.rounds} "
        f"rounds a mode, alternating; DP: epsilon {args.epsilon}, clip {args.clip}; medians"
    )
    print("| figure | no DP | DP | DP / no DP |")
    print("| --- | ---: | ---: | ---: |")
    for name in FIGURES:
        plain = statistics.median(figures["no DP"][name])
        dp = statistics.median(figures["DP"][name])
        print(f"| {name} | {plain:,.4f} | {dp:,.4f} | {dp / plain:.3f} |")


if __name__ == "__main__":
    main()
