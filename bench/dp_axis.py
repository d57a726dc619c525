"""compare_he's differential-privacy axis: the job's metric against epsilon.

    python bench/compare_he.py --quick --dp-epsilons 1,3,8 --no-floor --no-memory

For each epsilon the HE job runs again with distributed DP calibrated to it over the job's
rounds (``secagg.privacy``: the smallest noise multiplier whose rounds stay within it, at the
job's ``dp_delta``), each site clipping its change to ``--dp-clip``, and the plaintext job with
central DP at the same noise multiplier (the server adds the noise; the same epsilon); the
comparison's own HE run (no DP) is the last row. The report gains a table (epsilon, noise
multiplier, the final metric of both, round time, latency and bytes against HE without DP)
and a plot of the metric against epsilon. An epsilon the job cannot reach (its noise leaves
the codec no room for the round's updates) is a row that says why, and the axis goes on.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secagg.config import RunConfig
    from secagg.records import RunResult


@dataclass(frozen=True)
class Refused:
    """An epsilon whose run the job refused (``reason``: the one-line error), in place of
    its results."""

    epsilon: float
    reason: str


def run(
    config: RunConfig,
    epsilons: list[float],
    clip: float,
    out: Path,
    stamp: str,
    step: Any,
    tags: dict[str, str] | None = None,
) -> list[RunResult | Refused]:
    """The HE job once per epsilon, with DP calibrated to it, then the plaintext job with
    central DP (``step`` names each run; ``tags``: each MLflow run's, as the comparison's
    parent); an epsilon the job refuses gives two ``Refused`` in their place."""
    from secagg.errors import SecAggError
    from secagg.job import run_job

    results: list[RunResult | Refused] = []
    for index, epsilon in enumerate(epsilons, 1):
        for he in (True, False):
            kind = "HE, distributed" if he else "plaintext, central"
            step(f"differential privacy ({kind}): epsilon {epsilon}")
            dp = replace(
                config,
                he=he,
                dp_epsilon=epsilon,
                dp_noise=0.0,
                dp_clip=clip,
                output_dir=str(out / f"{stamp}-dp{index}-{'he' if he else 'plain'}-eps{epsilon:g}"),
            )
            try:
                results.append(run_job(dp, tags=tags or {}))
            except SecAggError as err:
                step(f"  refused: {err}")
                results += [Refused(epsilon, str(err))] * (2 if he else 1)
                break
    return results


def summarize(results: list[RunResult | Refused], he: RunResult) -> list[dict[str, Any]]:
    """One row per HE run (distributed DP), the HE run without DP last; each DP row holds
    the plaintext run with central DP at the same noise multiplier (``central_metric``); a
    refused epsilon's row holds why (``refused``)."""
    rows: list[dict[str, Any]] = []
    # ``results`` alternate: HE with distributed DP, then plaintext with central DP.
    pairs: list[tuple[RunResult | Refused, float | None]] = []
    for i in range(0, len(results), 2):
        central = results[i + 1]
        pairs.append((results[i], None if isinstance(central, Refused) else central.final))
    for result, central in [*pairs, (he, None)]:
        if isinstance(result, Refused):
            rows.append(
                {"epsilon_target": result.epsilon, "epsilon": None, "refused": result.reason}
            )
            continue
        config = result.config
        rounds = result.rounds
        rows.append(
            {
                "central_metric": central,
                "epsilon_target": config.dp_epsilon if config.dp else None,
                "epsilon": rounds[-1].epsilon if config.dp else None,
                "delta": config.dp_delta if config.dp else None,
                "noise_multiplier": config.noise_multiplier() if config.dp else None,
                "clip": config.dp_clip if config.dp else None,
                "quantile": config.dp_clip_quantile if config.dp else None,
                # adaptive clipping: the clip the last round used
                "last_clip": rounds[-1].metrics.get("train_dp_clip") if rounds else None,
                "final_metric": result.final,
                "metric_per_round": [r.value(config.headline) for r in rounds],
                "round_seconds": statistics.median(r.round_seconds for r in rounds),
                "latency_seconds": statistics.median(r.latency_seconds for r in rounds),
                "bytes_up_per_round": statistics.median(r.bytes_up for r in rounds),
                "bytes_down_per_round": statistics.median(r.bytes_down for r in rounds),
            }
        )
    return rows


def to_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    """The accuracy/epsilon table, each cost against HE without DP."""
    base = rows[-1]
    ran = [row for row in rows[:-1] if "refused" not in row]
    settings = ""
    if ran:
        clip = f"clip {ran[0]['clip']}"
        if ran[0].get("quantile"):
            clip += f" at first, adapted towards the {ran[0]['quantile']:g} quantile of the norms"
        settings = f" (delta {ran[0]['delta']}, {clip})"
    lines = [
        "## Differential privacy: the metric against epsilon",
        "",
        f"HE with distributed DP calibrated to each epsilon{settings}, and HE without DP; "
        "medians over rounds.",
        "",
        f"| epsilon | noise multiplier | final {metric}, HE + distributed DP | plaintext + "
        "central DP, same noise | round s (vs no DP) | latency s (vs no DP) | bytes up per "
        "round (vs no DP) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['epsilon_target']:g} | refused: {row['refused']} | | | | | |")
            continue
        eps = "no DP" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        noise = "-" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.3f}"
        if row.get("last_clip") is not None:  # adaptive clipping: where the clip ended
            noise += f" (last clip {row['last_clip']:.3g})"
        central = "-" if row["central_metric"] is None else f"{row['central_metric']:.4f}"
        lines.append(
            f"| {eps} | {noise} | {row['final_metric']:.4f} | {central} | "
            f"{row['round_seconds']:.3f} ({row['round_seconds'] / base['round_seconds']:.3f}x) | "
            f"{row['latency_seconds']:.3f} "
            f"({row['latency_seconds'] / base['latency_seconds']:.3f}x) | "
            f"{row['bytes_up_per_round']:,.0f} "
            f"({row['bytes_up_per_round'] / base['bytes_up_per_round']:.4f}x) |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], metric: str, plain: float, path: Path) -> Path:
    """The final metric against epsilon (log scale), with HE and plaintext without DP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dp = [r for r in rows if r["epsilon"] is not None and "refused" not in r]
    epsilons = [r["epsilon_target"] for r in dp]
    ax.plot(epsilons, [r["final_metric"] for r in dp], "o-", label="HE + distributed DP")
    ax.plot(epsilons, [r["central_metric"] for r in dp], "s--", label="plaintext + central DP")
    ax.axhline(rows[-1]["final_metric"], linestyle="--", color="gray", label="HE, no DP")
    ax.axhline(plain, linestyle=":", color="black", label="plaintext, no DP")
    ax.set_xscale("log")
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    delta = dp[0]["delta"] if dp else None
    ax.set(xlabel=f"epsilon (delta {delta})", ylabel=f"final {metric}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
