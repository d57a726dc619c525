"""How much noise distributed DP puts in the decrypted sum, against central DP's at the same
noise multiplier: measured on real codec rounds, and what the codec's steps would give without
the rotation.

    python bench/dp_noise.py                             # digits MLP, 8/30/100 sites, eps 1/3/8
    python bench/dp_noise.py --sites 100 --epsilons 3 --job jobs/bench_moderate_cnn.toml

For each number of sites ``n`` and each epsilon (the noise multiplier ``z`` that keeps the
job's rounds within it, every site in every round, delta 1e-5): ``n`` clients' clipped random
updates (norm ``--clip``) go through one real DP round of the packed codec (HE, the default
round policy's threshold ``t``), and the decrypted sum minus the exact sum is the noise. Its
standard deviation per value, over central DP's ``z C / n``, is the "measured" column: at
least ``sqrt(n / t)`` (any ``t`` sites carry the whole noise), more as the rounding to the
codec's steps adds to the sensitivity. The "steps from C" column is what the same calibration
gives with each site reporting the clip itself as its largest value (secagg before the
rotation), computed, not run. "refused": the noise leaves the codec no room for ``n``
updates (``--he-precision fine`` has 256 times the room).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.harness import REPO, keys_for, machine, table, write_report
from secagg import keys, privacy, quantize
from secagg.builtin import task_for
from secagg.config import RunConfig, load_job
from secagg.crypto import SERVER, Stamp, Update
from secagg.crypto.ckks import CkksClient
from secagg.crypto.ckks_server import CkksServer
from secagg.crypto.quantized import QuantizedCipher, _dp_steps, _room
from secagg.errors import PayloadError
from secagg.flatten import Layout, flatten, payload_layout


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, help="TOML job file (default: the digits job)")
    parser.add_argument("--sites", default="8,30,100", help="sites a round, comma-separated")
    parser.add_argument("--epsilons", default="1,3,8", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=10, help="the job's rounds (for z)")
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--he-precision", choices=("standard", "fine"), default="standard")
    parser.add_argument("--keys", type=Path, default=Path("keys"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args(argv)


def update_layout(config: RunConfig) -> Layout:
    """The job's model as a DP update with HE carries it (padded to whole rotation chunks)."""
    _, layout = flatten(task_for(config).build_model().state_dict())
    dp = replace(config, he=True, dp_noise=1.0)
    return payload_layout(layout, dp)


def measured(
    keys_dir: Path, layout: Layout, rule: privacy.Privacy, sites: int, precision: str
) -> float:
    """One real DP round of ``sites`` clients: the decrypted noise's deviation over central
    DP's (raises PayloadError when the codec has no room)."""
    loaded = keys.load_for_client(keys_dir)
    server = CkksServer(keys.load_for_server(keys_dir), precision)
    # One client cipher does every site's part: the sum is the same.
    cipher = QuantizedCipher(CkksClient(loaded, None, precision), layout, rule)
    stamp = Stamp(b"dp-noise-bench!!", 1, SERVER, sites)
    rng = np.random.default_rng(sites)
    changes = []
    for _ in range(sites):
        change = rng.normal(size=layout.size)
        rule.clip_change(change)
        changes.append(change)
    scales = server.sum(
        [cipher.prepare(x, stamp.for_sender(i), 1) for i, x in enumerate(changes)],
        stamp.scales(),
    )
    payloads = (
        cipher.encrypt(Update(x / sites, 1 / sites), stamp.for_sender(i), scales)
        for i, x in enumerate(changes)
    )
    summed = cipher.decrypt(server.sum(payloads, stamp), stamp, scales)
    noise = summed.values - sum(x / sites for x in changes)
    return float(noise.std()) / (rule.noise * rule.clip / sites)


def computed_from_clip(
    layout: Layout, rule: privacy.Privacy, sites: int, limit: int
) -> float | None:
    """The same ratio with steps set from the clip (no rotation), from the calibration alone;
    None when the codec would have had no room."""
    blocks = quantize.block_sizes(layout)
    one = quantize.histogram(np.empty(0), blocks, 1, peak=rule.clip)
    try:
        level, variance = _room((one * sites).tobytes(), sites, limit, rule, layout.size)
    except PayloadError:
        return None
    step = float(_dp_steps(one * sites, sites, level, sites).min())
    return math.sqrt(sites * variance) * step / (rule.noise * rule.clip / sites)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    keys_dir = keys_for(args.keys)
    config = load_job(args.job) if args.job else RunConfig()
    layout = update_layout(config)
    from secagg.crypto.packing import FINE, PACKED

    limit = (FINE if args.he_precision == "fine" else PACKED).sum_limit
    rows, results = [], []
    for sites in (int(s) for s in args.sites.split(",")):
        threshold = replace(config, clients=sites, clients_per_round=0).policy().threshold
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            z = privacy.noise_for(epsilon, args.rounds, 1.0, 1e-5)
            rule = privacy.Privacy(z, args.clip, threshold)
            try:
                ratio: float | None = measured(keys_dir, layout, rule, sites, args.he_precision)
            except PayloadError:
                ratio = None
            before = computed_from_clip(layout, rule, sites, limit)
            floor = math.sqrt(sites / threshold)
            print(f"{sites} sites, epsilon {epsilon:g}: {ratio}", file=sys.stderr)
            results.append(
                {
                    "sites": sites,
                    "epsilon": epsilon,
                    "noise_multiplier": z,
                    "threshold": threshold,
                    "measured": ratio,
                    "steps_from_clip": before,
                    "floor": floor,
                }
            )
            rows.append(
                [
                    sites,
                    f"{epsilon:g}",
                    f"{z:.2f}",
                    threshold,
                    _shown(ratio),
                    _shown(before),
                    f"{floor:.2f}",
                ]
            )
    header = ["sites", "epsilon", "z", "t", "measured (rotated)", "steps from C", "floor"]
    markdown = "\n".join(
        [
            "# Distributed DP's noise against central DP's",
            "",
            f"`python bench/dp_noise.py {' '.join(argv or sys.argv[1:])}`",
            "",
            f"{layout.size:,} values an update (the model, padded to whole rotation chunks), "
            f"clip {args.clip}, {args.rounds} rounds, delta 1e-5, he_precision "
            f"{args.he_precision}. The decrypted sum's noise per value over central DP's "
            "(`z C / n`) at the same noise multiplier: the floor is `sqrt(n / t)`.",
            "",
            *table(header, rows),
        ]
    )
    print(markdown)
    report = {"machine": machine(), "rows": results}
    md, _ = write_report(report, markdown + "\n", args.out, "dp-noise")
    print(f"report: {md}")
    return report


def _shown(ratio: float | None) -> str:
    return "refused" if ratio is None else f"{ratio:.2f}"


if __name__ == "__main__":
    main()
