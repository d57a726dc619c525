"""HE vs plaintext accuracy over several seeds, against the job's own floor (issue 13, target 3).

    python bench/seeds.py                      # headline job, seeds 0 1 2 (an hour on 2 CPUs)
    python bench/seeds.py --quick --seeds 0 1  # the digits MLP job, a few minutes

For every seed it runs ``compare_he`` once (plaintext, HE, and the float64 floor: plaintext with
its updates sent as float64 instead of float32), then states two things per the issue:

* **final accuracy**: for each seed, |HE − plaintext| against |float64 − plaintext| of the same
  seed (the floor: how far a change at the level of float32 rounding moves this job), and over
  the seeds, the mean of each: on a job whose outcome a rounding-level change moves by a test
  image or two, a single seed's comparison is close to a coin flip, their mean is not;
* **per round**: the mean over seeds of HE − plaintext, against the seed-to-seed spread (the
  standard deviation across seeds of the plaintext accuracy of that round).

It writes ``bench/results/<timestamp>-seeds.{md,json}`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_he


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="the digits MLP job")
    parser.add_argument("--job", type=Path, help="TOML job file (default: the headline job)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--keys", type=Path, default=compare_he.REPO / "keys")
    parser.add_argument("--out", type=Path, default=compare_he.REPO / "bench" / "results")
    return parser.parse_args(argv)


def summarize(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per seed final figures, and per round the mean HE − plaintext against the spread."""
    finals = {}
    for seed, report in reports.items():
        last = report["rounds"][-1]
        finals[seed] = {
            "plain": last["plain_accuracy"],
            "he": last["he_accuracy"],
            "float64": last["float64_accuracy"],
            "difference_points": last["difference_points"],
            "floor_points": last["floor_points"],
            "within_floor": abs(last["difference_points"]) <= abs(last["floor_points"]),
        }
    rounds = []
    for index in range(min(len(r["rounds"]) for r in reports.values())):
        rows = [r["rounds"][index] for r in reports.values()]
        plain = [100 * row["plain_accuracy"] for row in rows]
        mean = statistics.fmean(row["difference_points"] for row in rows)
        spread = statistics.stdev(plain) if len(plain) > 1 else 0.0
        rounds.append(
            {
                "round": index + 1,
                "mean_difference_points": mean,
                "seed_spread_points": spread,
                "within_spread": abs(mean) <= spread,
            }
        )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seeds": list(reports),
        "job": next(iter(reports.values()))["job"],
        "final": finals,
        "rounds": rounds,
        "final_within_floor_every_seed": all(f["within_floor"] for f in finals.values()),
        "final_mean_abs_difference_points": statistics.fmean(
            abs(f["difference_points"]) for f in finals.values()
        ),
        "final_mean_abs_floor_points": statistics.fmean(
            abs(f["floor_points"]) for f in finals.values()
        ),
        "rounds_within_spread": sum(r["within_spread"] for r in rounds),
        "time_ratios": {
            seed: {k: r["ratios"][k] for k in ("simulated_wall_time", "deployment_latency")}
            for seed, r in reports.items()
        },
    }


def to_markdown(summary: dict[str, Any]) -> str:
    job = summary["job"]
    lines = [
        f"# HE vs plaintext over seeds {summary['seeds']}: {job['model']} on {job['dataset']}, "
        f"{job['clients']} clients, {job['rounds']} rounds ({summary['date']})",
        "",
        "| seed | plaintext | HE | float64 | HE − plaintext (points) | floor (points) | within |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for seed, f in summary["final"].items():
        lines.append(
            f"| {seed} | {f['plain']:.4f} | {f['he']:.4f} | {f['float64']:.4f} | "
            f"{f['difference_points']:+.2f} | {f['floor_points']:+.2f} | "
            f"{'yes' if f['within_floor'] else 'no'} |"
        )
    difference = summary["final_mean_abs_difference_points"]
    floor = summary["final_mean_abs_floor_points"]
    lines += [
        "",
        f"Over the seeds: mean |HE − plaintext| {difference:.2f} points, mean |floor| "
        f"{floor:.2f} points ({'within' if difference <= floor else 'beyond'} the floor).",
        "",
        "| round | mean HE − plaintext (points) | seed-to-seed spread (points) | within |",
        "| ---: | ---: | ---: | --- |",
    ]
    for r in summary["rounds"]:
        lines.append(
            f"| {r['round']} | {r['mean_difference_points']:+.2f} | "
            f"{r['seed_spread_points']:.2f} | {'yes' if r['within_spread'] else 'no'} |"
        )
    ratios = ", ".join(
        f"seed {seed}: {r['simulated_wall_time']:.2f}x wall, {r['deployment_latency']:.2f}x latency"
        for seed, r in summary["time_ratios"].items()
    )
    lines += ["", f"Time, HE / plaintext (one pair per seed): {ratios}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common = ["--no-memory", "--no-tracking", "--keys", str(args.keys), "--out", str(args.out)]
    if args.quick:
        common.append("--quick")
    if args.job:
        common += ["--job", str(args.job)]
    if args.rounds:
        common += ["--rounds", str(args.rounds)]
    if args.quick:
        common += ["--repeats", "1"]
    reports = {seed: compare_he.main([*common, "--seed", str(seed)]) for seed in args.seeds}
    summary = summarize(reports)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(summary)
    (args.out / f"{stamp}-seeds.md").write_text(markdown + "\n")
    (args.out / f"{stamp}-seeds.json").write_text(json.dumps(summary, indent=2))
    print(markdown)
    return summary


if __name__ == "__main__":
    main()
