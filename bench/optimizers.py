"""Server optimizers side by side: accuracy per round of FedAvg, FedAdam and FedAvgM, with and
without HE, at two label skews, on one job with the same seed, partition and initial model.

    python bench/optimizers.py                  # the quick digits job, alpha 0.1 and 1.0, ~5 min
    python bench/optimizers.py --job jobs/bench_moderate_cnn.toml   # the headline job, hours
    python bench/optimizers.py --server-lr fedadam=0.01             # one optimizer's server lr

Every client applies the server optimizer to the decrypted average, so HE and plaintext runs of
one optimizer should agree round by round; the table shows each run's accuracy per round and
the figure draws plaintext solid, HE dashed. Results go to
``bench/results/optimizers-<timestamp>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from secagg.config import SERVER_OPTIMIZERS, RunConfig, load_job  # noqa: E402

QUICK_JOB = REPO / "jobs" / "digits.toml"
OPTIMIZERS = ("fedavg", "fedadam", "fedavgm")
ALPHAS = (0.1, 1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, default=QUICK_JOB, help="TOML job file [digits]")
    parser.add_argument("--optimizers", nargs="+", choices=SERVER_OPTIMIZERS, default=OPTIMIZERS)
    parser.add_argument("--alphas", nargs="+", type=float, default=ALPHAS)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument(
        "--server-lr",
        nargs="+",
        default=[],
        metavar="NAME=LR",
        help="a server lr for one optimizer, e.g. fedadam=0.01 (default: each one's own)",
    )
    parser.add_argument("--plain-only", action="store_true", help="skip the HE runs")
    parser.add_argument("--keys", type=Path, default=REPO / "keys", help="HE keys (default keys/)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args(argv)


def run_grid(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One run per (alpha, optimizer, mode); each row holds its accuracy per round."""
    from secagg.errors import TaskError
    from secagg.job import run_job

    base = load_job(args.job)
    given = {"rounds": args.rounds, "clients": args.clients}
    base = replace(base, **{k: v for k, v in given.items() if v is not None})
    base = replace(base, tracking=False, keys_dir=str(_keys(args.keys)))
    server_lr = _server_lrs(args.server_lr)
    modes = (False,) if args.plain_only else (False, True)
    rows = []
    for alpha in args.alphas:
        for name in args.optimizers:
            for he in modes:
                label = f"alpha {alpha:g} {name} {'HE' if he else 'plaintext'}"
                print(f"--- {label} ---", file=sys.stderr)
                config: RunConfig = replace(
                    base,
                    alpha=alpha,
                    server_optimizer=name,
                    server_lr=server_lr.get(name),
                    he=he,
                    output_dir=str(out / f"{alpha:g}-{name}-{'he' if he else 'plain'}"),
                ).validate()
                start = time.perf_counter()
                try:
                    accuracy = [r.value("accuracy") for r in run_job(config).rounds]
                    failed = None
                except TaskError as err:  # a run that diverged is a result, not a crash
                    accuracy, failed = [math.nan] * config.rounds, str(err)
                    print(f"  failed: {failed}", file=sys.stderr)
                rows.append(
                    {
                        "alpha": alpha,
                        "optimizer": name,
                        "he": he,
                        "accuracy": accuracy,
                        "failed": failed,
                        "seconds": time.perf_counter() - start,
                    }
                )
                print(f"  {[round(a, 4) for a in rows[-1]['accuracy']]}", file=sys.stderr)
    return rows


def _server_lrs(given: list[str]) -> dict[str, float]:
    """``["fedadam=0.01"]`` as ``{"fedadam": 0.01}``; a malformed one ends the script."""
    out = {}
    for item in given:
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sys.exit(f"--server-lr {item!r}: write NAME=LR, e.g. fedadam=0.01")
        if name not in SERVER_OPTIMIZERS or out[name] <= 0:
            sys.exit(f"--server-lr {item!r}: NAME is a server optimizer and LR positive")
    return out


def _keys(keys_dir: Path) -> Path:
    if (keys_dir / "manifest.json").exists():
        return keys_dir
    from secagg import keys
    from secagg.config import CkksParams

    temp = Path(tempfile.mkdtemp(prefix="secagg-bench-keys-"))
    keys.generate(temp, CkksParams())
    print(f"no keys in {keys_dir}/: using throwaway keys in {temp}/", file=sys.stderr)
    return temp


def to_markdown(
    rows: list[dict[str, Any]], job: RunConfig, server_lr: dict[str, float] | None = None
) -> str:
    """Accuracy per round, one line per run, and the HE-plaintext agreement per optimizer."""
    from secagg.optimizers import Hyper

    lrs = server_lr or {}

    rounds = len(rows[0]["accuracy"])
    lines = [
        f"Job `{job.job_name}`: {job.dataset} / {job.model}, {job.clients} clients, {rounds} "
        f"rounds, local {job.optimizer} lr {job.lr:g}, seed {job.seed}. Server optimizers: "
        + ", ".join(
            _settings(Hyper.of(replace(job, server_optimizer=n, server_lr=lrs.get(n))))
            for n in _names(rows)
        )
        + ".",
        "",
        "| alpha | server optimizer | mode | "
        + " | ".join(str(r) for r in range(1, rounds + 1))
        + " |",
        "| ---: | --- | --- |" + " ---: |" * rounds,
    ]
    for row in rows:
        cells = " | ".join(f"{a:.4f}" for a in row["accuracy"])
        mode = "HE" if row["he"] else "plaintext"
        lines.append(f"| {row['alpha']:g} | {row['optimizer']} | {mode} | {cells} |")
    pairs = _pairs(rows)
    if pairs:
        lines += ["", "HE − plaintext, largest difference over the rounds (points):", ""]
        for (alpha, name), (plain, he) in pairs.items():
            gap = max(abs(h - p) for p, h in zip(plain, he, strict=True))
            lines.append(f"- alpha {alpha:g}, {name}: {100 * gap:.2f}")
    return "\n".join(lines) + "\n"


def _names(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row["optimizer"] for row in rows))


def _settings(hyper: Any) -> str:
    if hyper.name == "fedavg":
        return f"fedavg (server lr {hyper.lr:g})"
    if hyper.name == "fedavgm":
        return f"fedavgm (server lr {hyper.lr:g}, momentum {hyper.momentum:g})"
    return (
        f"{hyper.name} (server lr {hyper.lr:g}, beta1 {hyper.beta1:g}, beta2 {hyper.beta2:g}, "
        f"tau {hyper.tau:g})"
    )


def _pairs(rows: list[dict[str, Any]]) -> dict[tuple[float, str], tuple[list[float], list[float]]]:
    by_key = {(r["alpha"], r["optimizer"], r["he"]): r["accuracy"] for r in rows}
    return {
        (alpha, name): (acc, by_key[(alpha, name, True)])
        for (alpha, name, he), acc in by_key.items()
        if not he and (alpha, name, True) in by_key
    }


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy per round: one panel per alpha, one colour per optimizer, HE dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = list(dict.fromkeys(row["alpha"] for row in rows))
    colours = {name: f"C{i}" for i, name in enumerate(_names(rows))}
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas), 4), sharey=True)
    axes = [axes] if len(alphas) == 1 else list(axes)
    for ax, alpha in zip(axes, alphas, strict=True):
        for row in (r for r in rows if r["alpha"] == alpha):
            rounds = range(1, len(row["accuracy"]) + 1)
            ax.plot(
                rounds,
                row["accuracy"],
                color=colours[row["optimizer"]],
                linestyle="--" if row["he"] else "-",
                marker="o" if row["he"] else None,
                markersize=3,
                label=f"{row['optimizer']} {'HE' if row['he'] else 'plaintext'}",
            )
        ax.set_title(f"Dirichlet alpha {alpha:g}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the grid; return the report (also written to ``--out``)."""
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = run_grid(args, out / "runs" / f"optimizers-{stamp}")
    job = load_job(args.job)
    markdown = to_markdown(
        rows, replace(job, clients=args.clients or job.clients), _server_lrs(args.server_lr)
    )
    paths = {
        "md": out / f"optimizers-{stamp}.md",
        "json": out / f"optimizers-{stamp}.json",
        "png": plot(rows, out / f"optimizers-{stamp}.png"),
    }
    paths["md"].write_text(markdown + f"\n![accuracy per round](optimizers-{stamp}.png)\n")
    report = {"date": stamp, "job": str(args.job), "rows": rows}
    report["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(report, indent=2))
    print(markdown)
    print(f"report: {paths['md']}  figure: {paths['png']}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
