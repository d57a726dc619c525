"""HE vs plaintext FedAvg, side by side, on one job with the same seed, partition and model.

    python bench/compare_he.py            # headline: ModerateCNN (3.5M params), 8 clients, ~20 min
    python bench/compare_he.py --quick    # the small digits MLP, about a minute

Two time figures are reported, and they answer different questions:

* **simulated wall time**: the sum of round times of this in-process simulation, where the
  clients run one after another on this machine;
* **deployment round latency**: what a deployment with the clients on their own machines would
  see per round, every client working at once: training, the scale exchange (HE), encrypting,
  the server adding each update as it arrives, and the slowest client's decrypt.

Accuracy is compared per round, and against a floor: a third run repeats the plaintext job with
its updates sent as float64 instead of float32, a change at the level of float32 rounding. How
far that moves the accuracy of a round is how far the job's own chaos moves it; an HE run cannot
be expected to track plaintext closer than plaintext tracks itself (``--no-floor`` skips it).

Peak memory is measured in separate processes (one playing a client, one the server) so the
figures are not mixed with the simulation's. Results go to stdout and to
``bench/results/<timestamp>.{md,json,png}``; the runs are logged to MLflow under one parent run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from typing import TYPE_CHECKING  # noqa: E402

from secagg.config import RunConfig, load_job  # noqa: E402

if TYPE_CHECKING:
    from secagg.records import RunResult

HEADLINE_JOB = REPO / "jobs" / "bench_moderate_cnn.toml"
QUICK_JOB = REPO / "jobs" / "digits.toml"
STEPS = ("train", "flatten", "scales", "encrypt", "aggregate", "decrypt", "evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, help="TOML job file (default: the headline job)")
    parser.add_argument("--quick", action="store_true", help="small digits MLP job, about a minute")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--dataset")
    parser.add_argument("--model")
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--keys", type=Path, default=REPO / "keys", help="HE keys (default keys/)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--no-tracking", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the third run (plaintext with float64 updates) that measures how much "
        "per-round accuracy moves under a rounding-level change alone",
    )
    parser.add_argument("--probe", choices=("client", "server"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-payload", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def job_config(args: argparse.Namespace) -> RunConfig:
    """The job both runs share, with the command line's overrides."""
    config = load_job(args.job or (QUICK_JOB if args.quick else HEADLINE_JOB))
    overrides = {
        "rounds": args.rounds,
        "clients": args.clients,
        "dataset": args.dataset,
        "model": args.model,
        "local_epochs": args.local_epochs,
        "tracking_uri": args.tracking_uri,
        "keys_dir": str(args.keys),
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return replace(config, tracking=not args.no_tracking, experiment="secagg-bench").validate()


def ensure_keys(keys_dir: Path) -> Path:
    """Use the user's keys, or throwaway ones made for this benchmark when there are none."""
    if (keys_dir / "manifest.json").exists():
        return keys_dir
    from secagg import keys
    from secagg.config import CkksParams

    temp = Path(tempfile.mkdtemp(prefix="secagg-bench-keys-"))
    keys.generate(temp, CkksParams())
    print(f"no keys in {keys_dir}/: using throwaway keys in {temp}/", file=sys.stderr)
    return temp


def run_pair(
    config: RunConfig, out: Path, stamp: str, floor: bool = True
) -> tuple[RunResult, RunResult, RunResult | None, str | None]:
    """Plaintext, HE and (``floor``) plaintext again with float64 updates, each in its own run
    folder, under one MLflow parent run."""
    # Imported here, not at the top: the server memory probe runs this script and must not
    # pay for torch, which secagg.job imports.
    from secagg.job import run_job

    parent = _parent_run(config, stamp)
    tags = {"mlflow.parentRunId": parent} if parent else {}
    runs = [("plain", False, "float32"), ("he", True, "float32")]
    if floor:
        runs.append(("float64", False, "float64"))
    results = []
    for label, he, precision in runs:
        print(f"--- {label} run ---", file=sys.stderr)
        folder = str(out / f"{stamp}-{label}")
        run_config = replace(config, he=he, plain_precision=precision, output_dir=folder)
        results.append(run_job(run_config, on_round=_progress(label, config.rounds), tags=tags))
    return results[0], results[1], results[2] if floor else None, parent


def _parent_run(config: RunConfig, stamp: str) -> str | None:
    if not config.tracking:
        return None
    from secagg.tracking import MlflowTracker

    tracker = MlflowTracker(config.tracking_uri, config.experiment)
    params = {"job": config.job_name, "clients": config.clients, "rounds": config.rounds}
    return tracker.start(params, {"bench": "compare_he"}, f"compare-he-{stamp}")


def _progress(label: str, total: int):  # type: ignore[no-untyped-def]
    def show(m) -> None:  # type: ignore[no-untyped-def]
        print(
            f"  {label:9} round {m.round:>2}/{total} acc {m.accuracy:.4f} {m.round_seconds:6.2f}s",
            file=sys.stderr,
        )

    return show


def measure_memory(config: RunConfig, work: Path) -> dict[str, dict[str, float]]:
    """Peak RSS of a client process and of a server process summing ``clients`` payloads."""
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "probe-config.json"
    memory: dict[str, dict[str, float]] = {}
    for he in (False, True):
        label = "he" if he else "plain"
        config_file.write_text(json.dumps(replace(config, he=he, tracking=False).to_dict()))
        payload = work / f"payload-{label}.bin"
        for role in ("client", "server"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--probe",
                    role,
                    "--probe-config",
                    str(config_file),
                    "--probe-payload",
                    str(payload),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[f"{label}_{role}"] = json.loads(out.stdout.strip().splitlines()[-1])
    return memory


def probe(role: str, config_file: Path, payload_file: Path) -> dict[str, float]:
    """Runs in a child process: one client's round, or the server's sum of every client."""
    config = RunConfig(**json.loads(config_file.read_text()))
    import numpy as np

    from secagg import crypto
    from secagg.crypto import SERVER, Stamp, Update

    stamp = Stamp(bytes(16), 1, SERVER, config.clients)
    if role == "client":
        from secagg.client import Client, resolve_device
        from secagg.job import simulated_site
        from secagg.task import task_for

        make_cipher = crypto.for_client(config.he, config.keys_dir, config.plain_precision)
        site = simulated_site(config, 0)
        client = Client(task_for(config), site, config, make_cipher, resolve_device(config.device))
        idle = _rss_mb()
        server_cipher = crypto.for_server(config.he, config.keys_dir, config.plain_precision)
        trained = client.train(stamp)
        # The client's own payloads, summed alone, stand in for the round's aggregates.
        scales = None
        if trained.scales is not None:
            scales = server_cipher.sum([trained.scales], stamp.scales())
        payload = client.seal(stamp, trained.num_samples, scales).payload
        client.apply(server_cipher.sum([payload], stamp), stamp, scales)
        peak = _peak_mb()
        # The server probe gets one payload per roster member (after the peak was read).
        # Ciphertexts look random whatever they hold, so zeros cost what an update does.
        zeros = Update(np.zeros(client.layout.size), 1.0 / config.clients)
        for sender in range(config.clients):
            update = client.cipher.encrypt(zeros, stamp.for_sender(sender), scales)
            payload_file.with_name(f"{payload_file.name}.{sender}").write_bytes(update)
    else:
        # The server process never imports torch or TenSEAL, nor loads the secret key.
        server_cipher = crypto.for_server(config.he, config.keys_dir, config.plain_precision)
        idle = _rss_mb()
        files = [payload_file.with_name(f"{payload_file.name}.{i}") for i in range(config.clients)]
        size = files[0].stat().st_size
        # Payloads arrive one at a time, as over the network; the sum holds one at a time.
        server_cipher.sum((path.read_bytes() for path in files), stamp)
        peak = _peak_mb()
    result = {"idle_mb": idle, "peak_mb": peak, "growth_mb": peak - idle}
    if role == "client":
        result["worker_peak_mb"] = _workers_peak_mb()
    if role == "server":
        result["payload_mb"] = size / 1e6
        result["growth_in_payloads"] = (peak - idle) / (size / 1e6)
    return result


def _workers_peak_mb() -> float:
    """Peak RSS of the largest encryption worker process (they are stopped to read it)."""
    import resource

    from secagg.crypto import ckks

    ckks.close_pools()
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _rss_mb() -> float:
    return _status_field("VmRSS")


def _peak_mb() -> float:
    return _status_field("VmHWM")


def _status_field(name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def summarize(
    plain: RunResult, he: RunResult, float64_run: RunResult | None, memory: dict[str, Any]
) -> dict[str, Any]:
    """Every figure of the report, as plain values."""
    params = plain.num_parameters
    floor = float64_run.rounds if float64_run is not None else [None] * len(plain.rounds)
    rounds = [
        {
            "round": p.round,
            "plain_accuracy": p.accuracy,
            "he_accuracy": h.accuracy,
            "difference_points": 100 * (h.accuracy - p.accuracy),
            "float64_accuracy": f.accuracy if f is not None else None,
            "floor_points": 100 * (f.accuracy - p.accuracy) if f is not None else None,
        }
        for p, h, f in zip(plain.rounds, he.rounds, floor, strict=True)
    ]

    def side(result: RunResult) -> dict[str, Any]:
        n = len(result.rounds)
        per_round = {
            step: sum(getattr(m, f"{step}_seconds") for m in result.rounds) / n for step in STEPS
        }
        up = sum(m.bytes_up_per_client for m in result.rounds) / n
        down = sum(m.bytes_down_per_client for m in result.rounds) / n
        return {
            "final_accuracy": result.final_accuracy,
            "simulated_wall_seconds": sum(m.round_seconds for m in result.rounds),
            "deployment_latency_seconds": sum(m.latency_seconds for m in result.rounds),
            "seconds_per_round": per_round,
            "upload_bytes_per_client_round": up,
            "download_bytes_per_client_round": down,
            "upload_bytes_per_parameter": up / params,
            "download_bytes_per_parameter": down / params,
            "mlflow_run_id": result.mlflow_run_id,
            "output_dir": str(result.output_dir),
        }

    p, h = side(plain), side(he)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "job": plain.config.to_dict(),
        "num_parameters": params,
        "plain": p,
        "he": h,
        "rounds": rounds,
        "max_abs_difference_points": max(abs(r["difference_points"]) for r in rounds),
        "max_abs_floor_points": (
            max(abs(r["floor_points"]) for r in rounds) if float64_run is not None else None
        ),
        "ratios": {
            "simulated_wall_time": h["simulated_wall_seconds"] / p["simulated_wall_seconds"],
            "deployment_latency": h["deployment_latency_seconds"] / p["deployment_latency_seconds"],
            "upload_bytes": h["upload_bytes_per_client_round"] / p["upload_bytes_per_client_round"],
            "download_bytes": h["download_bytes_per_client_round"]
            / p["download_bytes_per_client_round"],
        },
        "memory_mb": memory,
        "machine": _machine(),
    }


def _machine() -> dict[str, Any]:
    import os
    import platform

    import torch

    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "device": device,
        "torch": torch.__version__,
    }


def to_markdown(report: dict[str, Any]) -> str:
    p, h, r = report["plain"], report["he"], report["ratios"]
    job = report["job"]
    lines = [
        f"# HE vs plaintext FedAvg — {report['date']}",
        "",
        f"Job `{job['job_name']}`: {job['dataset']} / {job['model']} "
        f"({report['num_parameters']:,} parameters), {job['clients']} clients, {job['rounds']} "
        f"rounds, alpha {job['alpha']}, seed {job['seed']}. Machine: "
        f"{report['machine']['cpus']} CPUs, {report['machine']['device']}.",
        "",
        "| figure | plaintext | HE | HE / plaintext |",
        "| --- | ---: | ---: | ---: |",
        f"| final accuracy | {p['final_accuracy']:.4f} | {h['final_accuracy']:.4f} | "
        f"{100 * (h['final_accuracy'] - p['final_accuracy']):+.2f} points |",
        f"| simulated wall time (clients one after another) | {p['simulated_wall_seconds']:.1f} s"
        f" | {h['simulated_wall_seconds']:.1f} s | {r['simulated_wall_time']:.2f}x |",
        f"| deployment round latency, summed over rounds | {p['deployment_latency_seconds']:.1f}"
        f" s | {h['deployment_latency_seconds']:.1f} s | {r['deployment_latency']:.2f}x |",
        f"| upload per client per round | {_mb(p['upload_bytes_per_client_round'])} | "
        f"{_mb(h['upload_bytes_per_client_round'])} | {r['upload_bytes']:.2f}x |",
        f"| download per client per round | {_mb(p['download_bytes_per_client_round'])} | "
        f"{_mb(h['download_bytes_per_client_round'])} | {r['download_bytes']:.2f}x |",
        f"| upload bytes per parameter | {p['upload_bytes_per_parameter']:.2f} | "
        f"{h['upload_bytes_per_parameter']:.2f} | |",
        f"| download bytes per parameter | {p['download_bytes_per_parameter']:.2f} | "
        f"{h['download_bytes_per_parameter']:.2f} | |",
        "",
        "Time per round, summed over clients (seconds):",
        "",
        "| step | " + " | ".join(STEPS) + " |",
        "| --- |" + " ---: |" * len(STEPS),
    ]
    for label, side in (("plaintext", p), ("HE", h)):
        cells = " | ".join(f"{side['seconds_per_round'][s]:.3f}" for s in STEPS)
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        "Accuracy per round. The last column is the floor: plaintext FedAvg against itself,"
        " with its updates sent as float64 instead of float32, a change at the level of"
        " float32 rounding.",
        "",
        "| round | plaintext | HE | HE − plaintext (points) | float64 − float32 plaintext |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rounds"]:
        floor = row["floor_points"]
        lines.append(
            f"| {row['round']} | {row['plain_accuracy']:.4f} | {row['he_accuracy']:.4f} | "
            f"{row['difference_points']:+.2f} | "
            f"{'-' if floor is None else f'{floor:+.2f}'} |"
        )
    if report["memory_mb"]:
        lines += [
            "",
            "Peak memory (RSS, separate processes; MB):",
            "",
            "| process | idle | peak | growth |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, m in report["memory_mb"].items():
            lines.append(
                f"| {name} | {m['idle_mb']:.0f} | {m['peak_mb']:.0f} | {m['growth_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Accuracy per round, stacked time per round, and bytes per client, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, times, sizes) = plt.subplots(1, 3, figsize=(15, 4.2))
    rounds = [r["round"] for r in report["rounds"]]
    acc.plot(rounds, [r["plain_accuracy"] for r in report["rounds"]], "o-", label="plaintext")
    acc.plot(rounds, [r["he_accuracy"] for r in report["rounds"]], "s--", label="HE")
    if report["rounds"][0]["float64_accuracy"] is not None:
        float64_run = [r["float64_accuracy"] for r in report["rounds"]]
        acc.plot(rounds, float64_run, "^:", label="plaintext, float64 updates")
    acc.set(title="global test accuracy", xlabel="round", ylabel="accuracy")
    acc.legend()
    labels = ["plaintext", "HE"]
    bottom = [0.0, 0.0]
    for step in STEPS:
        values = [report[k]["seconds_per_round"][step] for k in ("plain", "he")]
        times.bar(labels, values, bottom=bottom, label=step)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    times.set(title="time per round (summed over clients)", ylabel="seconds")
    times.legend(fontsize=8)
    width = 0.35
    for offset, key in ((-width / 2, "upload"), (width / 2, "download")):
        values = [report[k][f"{key}_bytes_per_client_round"] / 1e6 for k in ("plain", "he")]
        sizes.bar([i + offset for i in range(2)], values, width, label=key)
    sizes.set_xticks(range(2), labels)
    sizes.set(title="bytes per client per round", ylabel="MB")
    sizes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; return the report (also written to ``--out``)."""
    args = parse_args(argv)
    if args.probe:
        result = probe(args.probe, args.probe_config, args.probe_payload)
        print(json.dumps(result))
        return result
    args.keys = ensure_keys(args.keys)
    config = job_config(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    plain, he, float64_run, parent = run_pair(config, out / "runs", stamp, not args.no_floor)
    memory = {} if args.no_memory else measure_memory(config, out / "runs" / f"{stamp}-memory")
    report = summarize(plain, he, float64_run, memory)
    markdown = to_markdown(report)
    paths = {
        "md": out / f"{stamp}.md",
        "json": out / f"{stamp}.json",
        "png": plot(report, out / f"{stamp}.png"),
    }
    paths["md"].write_text(markdown + f"\n![HE vs plaintext]({stamp}.png)\n")
    report["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(report, indent=2))
    if parent:
        _finish_parent(config, parent, report, paths)
    print(markdown)
    print(f"report: {paths['md']}  figure: {paths['png']}", file=sys.stderr)
    return report


def _finish_parent(config: RunConfig, parent: str, report: dict[str, Any], paths: dict) -> None:
    from secagg.tracking import MlflowTracker

    tracker = MlflowTracker(config.tracking_uri, config.experiment, run_id=parent)
    tracker.log_round(
        0,
        {
            "ratio_simulated_wall_time": report["ratios"]["simulated_wall_time"],
            "ratio_deployment_latency": report["ratios"]["deployment_latency"],
            "ratio_upload_bytes": report["ratios"]["upload_bytes"],
            "max_abs_accuracy_difference_points": report["max_abs_difference_points"],
            **(
                {"max_abs_floor_points": report["max_abs_floor_points"]}
                if report["max_abs_floor_points"] is not None
                else {}
            ),
        },
    )
    for path in paths.values():
        tracker.log_artifact(path)
    tracker.finish()


if __name__ == "__main__":
    main()
