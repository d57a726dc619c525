"""Many clients, few per round: seconds per round, peak memory and bytes, in-process and on Ray.

    python bench/scale.py            # digits and synthetic, 1,000 and 10,000 clients, 10 rounds
    python bench/scale.py --quick    # 2 rounds of each case: a smoke test
    python bench/scale.py --tasks synthetic --clients 1000,10000 --transports inprocess

Every case is an HE job (CKKS, the packed codec) of ``--rounds`` rounds in which
``--per-round`` of the population's ``--clients`` take part (``clients_per_round``), run in a
fresh Python process of its own so that its peak memory is its own. Tasks:

* ``digits``: the built-in digits MLP job (1,437 training examples: at most that many clients);
* ``synthetic``: ``bench.synthetic_task:SyntheticDigits``, the same MLP (9,610 parameters) on
  8x8 examples generated on demand from the seed, 20 per client (20,000 examples at 1,000
  clients, 200,000 at 10,000), never all in memory.

Transports: ``inprocess`` (the round's clients are objects in the driver, run one after
another) and ``ray`` (each client of a round is a Ray actor on a local Ray started for the
case). A Ray actor is a Python process with torch, TenSEAL and the task: about 0.5 GB of private
memory each on CPU, so ``--ray-per-round`` (default 10) sets the clients per round of the Ray
cases, and a case whose actors would not fit in the machine's available memory is skipped with
the reason.

Measured per case: the start-up (building the clients or starting Ray and its actors; for Ray
also ``ray.init`` and one actor's cold start alone, split into imports and ``load_data``), each
round's seconds (``RoundMetrics.round_seconds``: median and range; round 1 is also shown
apart, since on Ray it holds every actor's first training step), bytes per round (up and down,
as the transport counts them), and memory, sampled every 0.2 s and at each round's end: the
driver's RSS and its peak (VmHWM), the RSS of the driver's other descendants, and for Ray the
summed RSS and USS (private memory) of the client actor processes. RSS counts shared libraries
once per process; USS does not. Writes ``bench/results/scale-<timestamp>.{md,json}`` and prints
the markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import describe, keys_for, machine  # noqa: E402

SYNTHETIC = "bench.synthetic_task:SyntheticDigits"
DIGITS_TRAIN = 1437
#: private memory of one Ray client actor on CPU, measured (torch, TenSEAL, the task)
ACTOR_MB = 600


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds per case (smoke test)")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 10, 2 with --quick)")
    parser.add_argument(
        "--clients",
        default="1000,10000",
        help="populations, comma-separated (digits runs only those up to 1,437)",
    )
    parser.add_argument("--per-round", type=int, default=100, help="clients per round")
    parser.add_argument(
        "--ray-per-round",
        type=int,
        default=10,
        help="clients per round of the Ray cases (one actor each, ~0.5 GB private memory)",
    )
    parser.add_argument("--tasks", default="digits,synthetic", help="digits, synthetic")
    parser.add_argument("--transports", default="inprocess,ray", help="inprocess, ray")
    parser.add_argument(
        "--examples-per-client", type=int, default=20, help="synthetic task's examples per client"
    )
    parser.add_argument("--keys", type=Path, default=REPO / "keys", help="HE keys (default keys/)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 10
    return args


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every case to run, in order: in-process first, smaller populations first."""
    cases = []
    for transport in _names(args.transports, ("inprocess", "ray")):
        for task in _names(args.tasks, ("digits", "synthetic")):
            for clients in sorted(int(c) for c in args.clients.split(",")):
                if task == "digits" and clients > DIGITS_TRAIN:
                    continue
                per_round = args.ray_per_round if transport == "ray" else args.per_round
                cases.append(
                    {
                        "task": task,
                        "clients": clients,
                        "per_round": min(per_round, clients),
                        "transport": transport,
                        "rounds": args.rounds,
                        "examples_per_client": args.examples_per_client,
                    }
                )
    return cases


def _names(text: str, known: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown {name!r}: choose from {', '.join(known)}")
    return names


# ---------------------------------------------------------------- one case, in its own process


def run_case(case: dict[str, Any], keys_dir: Path, work: Path) -> dict[str, Any]:
    """One job, measured; runs in a process of its own (``--case``)."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    from secagg.config import RunConfig
    from secagg.job import run_job

    settings: dict[str, Any] = {}
    task = None
    if case["task"] == "synthetic":
        task = SYNTHETIC
        settings = {"examples_per_client": case["examples_per_client"]}
    config = RunConfig(
        task=task,
        task_settings=settings,
        he=True,
        clients=case["clients"],
        clients_per_round=case["per_round"],
        rounds=case["rounds"],
        keys_dir=str(keys_dir),
        tracking=False,
        output_dir=str(work / "run"),
        transport=case["transport"],
        job_name=f"scale-{case['task']}",
    ).validate()
    result: dict[str, Any] = dict(case)
    sampler = Sampler(actors=case["transport"] == "ray")
    ray = None
    start = time.perf_counter()
    if case["transport"] == "ray":
        ray = _start_ray(config, result)
    sampler.start()
    rounds: list[dict[str, Any]] = []
    marks: dict[str, float] = {}

    def on_progress(phase: str, done: int, total: int) -> None:
        if phase == "tracking" and done == 0 and "clients_ready" not in marks:
            marks["clients_ready"] = time.perf_counter()

    def on_round(m: Any) -> None:
        snap = sampler.snapshot()
        rounds.append(
            {
                "round": m.round,
                "seconds": m.round_seconds,
                "bytes_up": m.bytes_up,
                "bytes_down": m.bytes_down,
                "accuracy": m.value("accuracy"),
                "client_seconds": m.train_seconds
                + m.flatten_seconds
                + m.scales_seconds
                + m.encrypt_seconds
                + m.decrypt_seconds,
                **snap,
            }
        )

    begun = time.perf_counter()
    try:
        run_job(config, on_round=on_round, on_progress=on_progress)
    finally:
        sampler.stop()
        if ray is not None:
            ray.shutdown()
    result["startup_seconds"] = marks.get("clients_ready", begun) - begun
    result["total_seconds"] = time.perf_counter() - start
    result["rounds_measured"] = rounds
    result["memory"] = sampler.peaks()
    return result


def _start_ray(config: Any, result: dict[str, Any]) -> Any:
    """A local Ray as RayTransport starts one (timed), and one actor's cold start alone."""
    import ray

    from secagg.transport.ray import _local_cpus

    actors = config.per_round + (1 if config.per_round < config.clients else 0)
    t = time.perf_counter()
    ray.init(
        num_cpus=_local_cpus(config.transport_settings, actors),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    result["ray_init_seconds"] = time.perf_counter() - t
    result["actors"] = actors

    @ray.remote(num_cpus=config.client_cpus)
    class Probe:
        def cold(self, config: Any) -> dict[str, float]:
            t0 = time.perf_counter()
            import torch  # noqa: F401

            import secagg.client  # noqa: F401
            from secagg.builtin import task_for
            from secagg.crypto import ckks  # noqa: F401
            from secagg.job import simulated_site

            t1 = time.perf_counter()
            task_for(config).load_data(simulated_site(config, 0))
            return {"imports": t1 - t0, "load_data": time.perf_counter() - t1}

    t = time.perf_counter()
    probe = Probe.remote()  # type: ignore[attr-defined]
    inside = ray.get(probe.cold.remote(config))
    result["actor_cold_start"] = {
        "wall_seconds": time.perf_counter() - t,
        "imports_seconds": inside["imports"],
        "load_data_seconds": inside["load_data"],
    }
    ray.kill(probe)
    return ray


class Sampler:
    """Memory of this process and its descendants, every 0.2 s and on demand (MB)."""

    def __init__(self, actors: bool) -> None:
        self.actors = actors
        self.peak: dict[str, float] = {}
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.snapshot()

    def snapshot(self) -> dict[str, float]:
        me = os.getpid()
        snap = {"driver_rss_mb": _status(me, "VmRSS"), "driver_peak_mb": _status(me, "VmHWM")}
        others = actors = actors_uss = 0.0
        n_actors = 0
        for pid in _descendants(me):
            rss = _status(pid, "VmRSS")
            if self.actors and "ClientActor" in _cmdline(pid):
                actors += rss
                actors_uss += _uss(pid)
                n_actors += 1
            else:
                others += rss
        snap["descendants_rss_mb"] = others
        if self.actors:
            snap.update(actors_rss_mb=actors, actors_uss_mb=actors_uss, actor_processes=n_actors)
        with self._lock:
            self.count += 1
            for key, value in snap.items():
                self.peak[key] = max(self.peak.get(key, 0.0), value)
        return snap

    def peaks(self) -> dict[str, float]:
        with self._lock:
            return {**self.peak, "samples": self.count}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _status(pid: int, field: str) -> float:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _uss(pid: int) -> float:
    total = 0
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


def _cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace("\0", " ")


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# ---------------------------------------------------------------- the driver of all cases


def run_all(args: argparse.Namespace, keys_dir: Path) -> list[dict[str, Any]]:
    results = []
    env = dict(os.environ)
    # Ray's workers import the synthetic task by its path: bench/ must be importable there.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONWARNINGS"] = "ignore::UserWarning"
    for case in plan(args):
        label = _label(case)
        skip = _too_big(case)
        if skip:
            print(f"{label}: skipped, {skip}", file=sys.stderr, flush=True)
            results.append({**case, "skipped": skip})
            continue
        print(f"{label} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="secagg-scale-") as work:
            out = Path(work) / "case.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
            command += ["--keys", str(keys_dir), "--out", str(out)]
            done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0 or not out.exists():
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                print("\n".join(tail), file=sys.stderr)
                results.append({**case, "failed": tail[-1] if tail else f"rc {done.returncode}"})
                continue
            result = summarize_case(json.loads(out.read_text()))
        print(f"{label}: {_case_line(result)}", file=sys.stderr, flush=True)
        results.append(result)
    return results


def _too_big(case: dict[str, Any]) -> str | None:
    if case["transport"] != "ray":
        return None
    actors = case["per_round"] + (1 if case["per_round"] < case["clients"] else 0)
    need = actors * ACTOR_MB
    have = _status_meminfo("MemAvailable")
    if need > have:
        return (
            f"{actors} Ray actors need about {need / 1024:.0f} GB, {have / 1024:.0f} GB available"
        )
    return None


def _status_meminfo(field: str) -> float:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def summarize_case(raw: dict[str, Any]) -> dict[str, Any]:
    rounds = raw["rounds_measured"]
    seconds = [r["seconds"] for r in rounds]
    later = seconds[1:] or seconds
    sent = [r["bytes_up"] + r["bytes_down"] for r in rounds]
    return {
        **raw,
        "round_seconds": {
            "median": statistics.median(seconds),
            "min": min(seconds),
            "max": max(seconds),
            "first": seconds[0],
            "median_after_first": statistics.median(later),
        },
        "bytes_per_round": {
            "median": statistics.median(sent),
            "up": statistics.median(r["bytes_up"] for r in rounds),
            "down": statistics.median(r["bytes_down"] for r in rounds),
        },
        "memory_per_round": [
            {k: r[k] for k in r if k.endswith("_mb") or k == "round"} for r in rounds
        ],
        "final_accuracy": rounds[-1]["accuracy"],
    }


def flatness(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Peak memory at the largest population over the smallest, per task and transport (the
    same clients per round)."""
    out = []
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in results:
        if "memory" in r:
            groups.setdefault((r["task"], r["transport"], r["per_round"]), []).append(r)
    for (task, transport, per_round), group in groups.items():
        if len(group) < 2:
            continue
        small, large = min(group, key=_pop), max(group, key=_pop)
        key = "actors_uss_mb" if transport == "ray" else "driver_peak_mb"
        figures = {}
        for name in ("driver_peak_mb", key):
            a, b = small["memory"][name], large["memory"][name]
            figures[name] = {"small": a, "large": b, "ratio": b / a if a else float("nan")}
        ratio = max(f["ratio"] for f in figures.values())
        out.append(
            {
                "task": task,
                "transport": transport,
                "per_round": per_round,
                "clients": [small["clients"], large["clients"]],
                "figures": figures,
                "flat": ratio <= 1.10,
            }
        )
    return out


def _pop(r: dict[str, Any]) -> int:
    return int(r["clients"])


def _label(case: dict[str, Any]) -> str:
    return (
        f"{case['task']} {case['clients']:,} clients, {case['per_round']}/round, "
        + case["transport"]
    )


def _case_line(r: dict[str, Any]) -> str:
    s = r["round_seconds"]
    return (
        f"start-up {r['startup_seconds']:.1f} s, round {s['median']:.2f} s "
        f"({s['min']:.2f}-{s['max']:.2f}), driver peak {r['memory']['driver_peak_mb']:.0f} MB"
    )


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Scale benchmark, {report['stamp']}",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']}. HE (CKKS, packed codec), {report['rounds']} rounds per "
        "case, each case in a fresh process. Round seconds: median (min-max) over the rounds; "
        "round 1 apart. Memory: peaks of samples every 0.2 s and at each round's end.",
        "",
        "| task | clients | per round | transport | start-up s | round s, median (range) "
        "| round 1 s | later rounds s | MB per round (up+down) | driver peak RSS MB "
        "| other descendants RSS MB | Ray actors: RSS / USS MB | final acc |",
        "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in report["cases"]:
        if "round_seconds" not in r:
            why = r.get("skipped") or r.get("failed")
            lines.append(
                f"| {r['task']} | {r['clients']:,} | {r['per_round']} | {r['transport']} "
                f"| {why} | | | | | | | | |"
            )
            continue
        s, m = r["round_seconds"], r["memory"]
        actors = (
            f"{m['actors_rss_mb']:.0f} / {m['actors_uss_mb']:.0f} ({r['actors']} actors)"
            if r["transport"] == "ray"
            else "-"
        )
        lines.append(
            f"| {r['task']} | {r['clients']:,} | {r['per_round']} | {r['transport']} "
            f"| {r['startup_seconds']:.1f} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) "
            f"| {s['first']:.2f} | {s['median_after_first']:.2f} "
            f"| {r['bytes_per_round']['median'] / 1e6:.2f} | {m['driver_peak_mb']:.0f} "
            f"| {m['descendants_rss_mb']:.0f} | {actors} | {r['final_accuracy']:.3f} |"
        )
    ray_cases = [r for r in report["cases"] if "actor_cold_start" in r]
    if ray_cases:
        lines += [
            "",
            "Where Ray's start-up goes (a local Ray started per case; start-up is building "
            "every actor after one probe actor started alone):",
            "",
            "| case | ray.init s | one actor alone: wall s (imports, load_data) | actors "
            "| all actors started s | round 1 s | later rounds s |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in ray_cases:
            c = r["actor_cold_start"]
            lines.append(
                f"| {r['task']} {r['clients']:,} | {r['ray_init_seconds']:.1f} "
                f"| {c['wall_seconds']:.1f} ({c['imports_seconds']:.1f}, "
                f"{c['load_data_seconds']:.1f}) | {r['actors']} | {r['startup_seconds']:.1f} "
                f"| {r['round_seconds']['first']:.2f} "
                f"| {r['round_seconds']['median_after_first']:.2f} |"
            )
    if report["flatness"]:
        lines += [
            "",
            "Memory from the smallest population to the largest (same clients per round):",
            "",
        ]
        for f in report["flatness"]:
            parts = ", ".join(
                f"{name} {v['small']:.0f} -> {v['large']:.0f} MB ({v['ratio']:.2f}x)"
                for name, v in f["figures"].items()
            )
            verdict = "flat" if f["flat"] else "NOT flat"
            lines.append(
                f"- {f['task']}, {f['transport']}, {f['clients'][0]:,} -> "
                f"{f['clients'][1]:,} clients: {parts}: **{verdict}** (within 10%)"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.case:
        result = run_case(json.loads(args.case), args.keys, args.out.parent)
        args.out.write_text(json.dumps(result))
        return result
    keys_dir = keys_for(args.keys)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    cases = run_all(args, keys_dir)
    report = {
        "stamp": stamp,
        "command": "python bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe(machine()),
        "rounds": args.rounds,
        "cases": cases,
        "flatness": flatness(cases),
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    md, js = args.out / f"scale-{stamp}.md", args.out / f"scale-{stamp}.json"
    report["files"] = {"md": str(md), "json": str(js)}
    markdown = to_markdown(report)
    md.write_text(markdown)
    js.write_text(json.dumps(report, indent=2))
    print(markdown)
    print(f"wrote {md} and {js} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
