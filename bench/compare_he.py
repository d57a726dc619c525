"""HE vs plaintext FedAvg, side by side, on one job with the same seed, partition and model.

    python bench/compare_he.py            # headline: ModerateCNN (3.5M params), 8 clients, ~20 min
    python bench/compare_he.py --quick    # the small digits MLP, 3 timed repeats, a few minutes
    python bench/compare_he.py --quick --server-optimizer fedadam   # both runs with FedAdam

Timing: an untimed warm-up (one round of the job per mode, so imports, data, compiled kernels
and caches are ready) comes first; then the pair is run ``--repeats`` times (3 with
``--quick``, 1 for the headline job), alternating which mode goes first, and every time figure
is the median with its range across repeats. A ratio below 1.0 is reported as within noise: HE
only adds work to a round, so a run where it came out faster measured noise.

Two time figures are reported, and they answer different questions:

* **simulated wall time**: the sum of round times of this in-process simulation, where the
  clients run one after another on this machine;
* **deployment round latency**: what a deployment with the clients on their own machines would
  see per round, every client working at once: training, the scale exchange (HE), encrypting,
  the server checking each update as it arrives (side by side, as the network server's upload
  handlers do) and adding them in turn, and the slowest client's decrypt. Reported summed over
  rounds, and as the median of the rounds' own HE / plaintext ratios (one round slowed by
  something outside the job moves the sum, not that median).

Accuracy is compared per round, and against a floor: a third run repeats the plaintext job with
its updates sent as float64 instead of float32, a change at the level of float32 rounding. How
far that moves the accuracy of a round is how far the job's own chaos moves it; an HE run cannot
be expected to track plaintext closer than plaintext tracks itself (``--no-floor`` skips it).

Peak memory is measured in separate processes (one playing a client, one the server) so the
figures are not mixed with the simulation's. Results go to stdout and to
``bench/results/<timestamp>.{md,json,png}``. The first repeat's plaintext and HE runs (and the
floor run) are logged to MLflow under one parent run, which holds the report, a figure of
accuracy per round for both runs, and the ratios; the last lines printed are the URL of the
MLflow page comparing the two runs and the command that serves the UI.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from typing import TYPE_CHECKING  # noqa: E402

from bench.harness import keys_for, machine, peak_mb, rss_mb  # noqa: E402
from secagg.config import (  # noqa: E402
    HE_PRECISIONS,
    LR_SCHEDULES,
    SERVER_OPTIMIZERS,
    RunConfig,
    load_job,
)
from secagg.crypto.seal_format import wire_nbytes  # noqa: E402
from secagg.files import finite  # noqa: E402

if TYPE_CHECKING:
    from secagg.records import RunResult

HEADLINE_JOB = REPO / "jobs" / "bench_moderate_cnn.toml"
QUICK_JOB = REPO / "jobs" / "digits.toml"
OPTIMIZATION = (
    "server_optimizer",
    "server_lr",
    "server_momentum",
    "beta1",
    "beta2",
    "tau",
    "fedprox_mu",
    "lr_schedule",
    "he_precision",
)
STEPS = ("train", "flatten", "scales", "encrypt", "aggregate", "decrypt", "evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, help="TOML job file (default: the headline job)")
    parser.add_argument("--quick", action="store_true", help="the digits MLP job, 3 repeats")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--dataset")
    parser.add_argument("--model")
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--alpha", type=float, help="Dirichlet label skew")
    parser.add_argument("--seed", type=int, help="the job's seed (data, partition, model)")
    # Federated optimization: both runs take the same steps (secagg.optimizers).
    parser.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS)
    parser.add_argument("--server-lr", type=float)
    parser.add_argument("--server-momentum", type=float)
    parser.add_argument("--beta1", type=float)
    parser.add_argument("--beta2", type=float)
    parser.add_argument("--tau", type=float)
    parser.add_argument("--fedprox-mu", type=float)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES)
    parser.add_argument(
        "--he-precision", choices=HE_PRECISIONS, help="the HE run's packing (default: auto)"
    )
    parser.add_argument(
        "--keys",
        type=Path,
        default=Path("keys"),
        help="HE keys, as secagg keygen made them (default: keys/ in the working directory; "
        "throwaway keys when there are none there, said on the console)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--no-tracking", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed repeats of the pair, alternating which goes first (default: 3 with "
        "--quick, 1 for the headline job); times are medians with their range",
    )
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the third run (plaintext with float64 updates) that measures how much "
        "per-round accuracy moves under a rounding-level change alone",
    )
    parser.add_argument(
        "--dp-epsilons",
        help="a differential-privacy axis: run HE again with DP calibrated to each of these "
        "epsilons (comma-separated, e.g. 1,3,8), and report the metric against epsilon",
    )
    parser.add_argument(
        "--dp-clip", type=float, default=1.0, help="the DP axis's clipping bound (default 1.0)"
    )
    parser.add_argument(
        "--dp-clip-quantile",
        type=float,
        default=0.0,
        help="the DP axis with adaptive clipping: --dp-clip is the first round's bound, then it "
        "follows this quantile of the update norms (e.g. 0.5; default 0: fixed)",
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
        "alpha": args.alpha,
        "seed": args.seed,
        **{name: getattr(args, name) for name in OPTIMIZATION},
        "tracking_uri": args.tracking_uri,
        "keys_dir": str(args.keys),
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return replace(config, tracking=not args.no_tracking, experiment="secagg-bench").validate()


class Runs:
    """Every run of one comparison: ``plain[i]`` and ``he[i]`` are repeat ``i``'s pair."""

    def __init__(self) -> None:
        self.plain: list[RunResult] = []
        self.he: list[RunResult] = []
        self.float64: RunResult | None = None
        #: which mode went first in each repeat
        self.order: list[str] = []
        self.parent: str | None = None


def run_all(config: RunConfig, out: Path, stamp: str, repeats: int = 1, floor: bool = True) -> Runs:
    """An untimed warm-up, then ``repeats`` timed pairs (plaintext and HE, which goes first
    alternating), then (``floor``) plaintext again with float64 updates, each in its own run
    folder. The first pair and the floor run are logged under one MLflow parent run."""
    # Imported here, not at the top: the server memory probe runs this script and must not
    # pay for torch, which secagg.job imports.
    from secagg.job import run_job

    runs = Runs()
    bar = _Bar(2 + 2 * repeats + int(floor), "runs")
    warm = replace(config, rounds=1, local_epochs=1, tracking=False)
    for label, he in (("plain", False), ("he", True)):
        bar.step(f"warm-up: one untimed round, {label}")
        run_job(
            replace(warm, he=he, output_dir=str(out / f"{stamp}-warmup-{label}")),
            on_progress=bar.phase,
        )
    runs.parent = _parent_run(config, stamp)
    tags = {"mlflow.parentRunId": runs.parent} if runs.parent else {}
    for repeat in range(repeats):
        order = ["plain", "he"] if repeat % 2 == 0 else ["he", "plain"]
        runs.order.append(order[0])
        for label in order:
            bar.step(f"repeat {repeat + 1}/{repeats}: {label}")
            run_config = replace(
                config,
                he=label == "he",
                output_dir=str(out / f"{stamp}-{label}-r{repeat + 1}"),
                tracking=config.tracking and repeat == 0,
            )
            result = run_job(
                run_config,
                on_round=_progress(label, config.rounds, bar.line, config.headline),
                on_progress=bar.phase,
                tags=tags,
            )
            (runs.he if label == "he" else runs.plain).append(result)
    if floor:
        bar.step("floor: plaintext with float64 updates")
        run_config = replace(
            config, he=False, plain_precision="float64", output_dir=str(out / f"{stamp}-float64")
        )
        runs.float64 = run_job(
            run_config,
            on_round=_progress("float64", config.rounds, bar.line, config.headline),
            on_progress=bar.phase,
            tags=tags,
        )
    bar.close()
    return runs


class _Bar:
    """The benchmark's progress on stderr: on a terminal, a bar over its runs (or memory
    probes) showing the current one and its phase (``round 2: encrypt 3/8``); elsewhere the
    ``--- step ---`` and per-round lines it always printed, so logs read as before."""

    def __init__(self, total: int, unit: str) -> None:
        self.bar: Any = None
        self.label = ""
        self.round = 0
        self.started = False
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def step(self, label: str) -> None:
        """The next run (or probe) starts; the one before is done."""
        if self.bar is None:
            print(f"--- {label} ---", file=sys.stderr)
            return
        if self.started:
            self.bar.update(1)
        self.started, self.label, self.round = True, label, 1
        self.bar.set_description_str(label)

    def phase(self, phase: str, done: int, total: int) -> None:
        """``on_progress`` for run_job."""
        if self.bar is not None:
            where = f"round {self.round}: " if phase not in ("clients", "tracking") else ""
            self.bar.set_description_str(f"{self.label}, {where}{phase} {done}/{total}")
            if phase == "evaluate" and done == total:
                self.round += 1

    def line(self, text: str) -> None:
        if self.bar is None:
            print(text, file=sys.stderr)
        else:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


def _parent_run(config: RunConfig, stamp: str) -> str | None:
    if not config.tracking:
        return None
    from secagg.labels import tags_for
    from secagg.tracking import DESCRIPTION_TAG, MlflowTracker

    tracker = MlflowTracker(config.tracking_uri, config.experiment)
    params = {"job": config.job_name, "clients": config.clients, "rounds": config.rounds}
    tags = {
        **tags_for(config),
        "he": "both",
        "mode": "he-vs-plain",
        "bench": "compare_he",
        DESCRIPTION_TAG: f"HE vs plaintext FedAvg on job `{config.job_name}` "
        f"({config.model} on {config.dataset}, {config.clients} clients, {config.rounds} "
        "rounds): the two runs are this run's children. Figures follow when it finishes.",
    }
    name = f"he-vs-plain-{config.job_name}-{config.clients}c-{stamp[4:]}"
    return tracker.start(params, tags, name)


def _progress(label: str, total: int, echo, metric: str):  # type: ignore[no-untyped-def]
    from secagg.labels import headline

    def show(m) -> None:  # type: ignore[no-untyped-def]
        value = headline(metric, m.value(metric))
        echo(f"  {label:9} round {m.round:>2}/{total} {value} {m.round_seconds:6.2f}s")

    return show


def measure_memory(config: RunConfig, work: Path) -> dict[str, dict[str, float]]:
    """Peak RSS of a client process and of a server process summing ``clients`` payloads."""
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "probe-config.json"
    memory: dict[str, dict[str, float]] = {}
    bar = _Bar(4, "probes")
    for he in (False, True):
        label = "he" if he else "plain"
        config_file.write_text(json.dumps(replace(config, he=he, tracking=False).to_dict()))
        payload = work / f"payload-{label}.bin"
        for role in ("client", "server"):
            bar.step(f"memory probe: a {label} {role} process")
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
    bar.close()
    return memory


def probe(role: str, config_file: Path, payload_file: Path) -> dict[str, float]:
    """Runs in a child process: one client's round, or the server's sum of every client."""
    config = RunConfig(**json.loads(config_file.read_text()))
    import numpy as np

    from secagg import crypto
    from secagg.crypto import SERVER, Stamp, Update

    stamp = Stamp(bytes(16), 1, SERVER, config.clients)
    if role == "client":
        from secagg.builtin import task_for
        from secagg.client import Client, resolve_device
        from secagg.job import simulated_site

        make_cipher = crypto.for_client(config.he, config.keys_dir, config.precision)
        site = simulated_site(config, 0)
        client = Client(task_for(config), site, config, make_cipher, resolve_device(config.device))
        idle = rss_mb()
        server_cipher = crypto.for_server(config.he, config.keys_dir, config.precision)
        trained = client.train(stamp.for_sender(0))
        # The client's own payloads, summed alone, stand in for the round's aggregates.
        scales = None
        if trained.scales is not None:
            scales = server_cipher.sum([trained.scales], stamp.scales())
        payload = client.seal(stamp.for_sender(0), trained.num_samples, scales).payload
        client.apply(server_cipher.sum([payload], stamp), stamp, scales)
        peak = peak_mb()
        # The server probe gets one payload per roster member (after the peak was read).
        # Ciphertexts look random whatever they hold, so zeros cost what an update does.
        zeros = Update(np.zeros(client.layout.size), 1.0 / config.clients)
        for sender in range(config.clients):
            update = client.cipher.encrypt(zeros, stamp.for_sender(sender), scales)
            payload_file.with_name(f"{payload_file.name}.{sender}").write_bytes(update)
    else:
        # The server process never imports torch or TenSEAL, nor loads the secret key.
        server_cipher = crypto.for_server(config.he, config.keys_dir, config.precision)
        idle = rss_mb()
        files = [payload_file.with_name(f"{payload_file.name}.{i}") for i in range(config.clients)]
        size = files[0].stat().st_size
        # Payloads arrive one at a time, as over the network; the sum holds one at a time.
        server_cipher.sum((path.read_bytes() for path in files), stamp)
        peak = peak_mb()
    result = {"idle_mb": idle, "peak_mb": peak, "growth_mb": peak - idle}
    if role == "server":
        result["payload_mb"] = size / 1e6
        result["growth_in_payloads"] = (peak - idle) / (size / 1e6)
    return result


#: the time figures repeated runs give a median and a range for, and their report names
TIMES = {
    "run_seconds": "run wall time (start to finish, as results.json `seconds`)",
    "simulated_wall_seconds": "simulated wall time (rounds only, clients one after another)",
    "deployment_latency_seconds": "deployment round latency, summed over rounds",
}


def summarize(runs: Runs, memory: dict[str, Any], keys_dir: Path | None = None) -> dict[str, Any]:
    """Every figure of the report, as plain values."""
    plain, he, float64_run = runs.plain[0], runs.he[0], runs.float64
    params = plain.num_parameters or 0
    floor = float64_run.rounds if float64_run is not None else [None] * len(plain.rounds)
    name = plain.config.headline
    rounds = [
        {
            "round": p.round,
            # the job's headline metric (``metric``): its value, and HE − plaintext in
            # hundredths of it ("points")
            "plain_metric": p.value(name),
            "he_metric": h.value(name),
            "difference_points": 100 * (h.value(name) - p.value(name)),
            "float64_metric": f.value(name) if f is not None else None,
            "floor_points": 100 * (f.value(name) - p.value(name)) if f is not None else None,
            # the task's own evaluation metrics (accuracy, auc, dice...), both runs
            "plain_metrics": _evaluated(p.metrics),
            "he_metrics": _evaluated(h.metrics),
        }
        for p, h, f in zip(plain.rounds, he.rounds, floor, strict=True)
    ]

    def side(results: list[RunResult]) -> dict[str, Any]:
        first = results[0]
        n = len(first.rounds)
        samples = {
            "run_seconds": [r.seconds for r in results],
            "simulated_wall_seconds": [sum(m.round_seconds for m in r.rounds) for r in results],
            "deployment_latency_seconds": [
                sum(m.latency_seconds for m in r.rounds) for r in results
            ],
        }
        per_round = {
            step: statistics.median(
                sum(getattr(m, f"{step}_seconds") for m in r.rounds) / n for r in results
            )
            for step in STEPS
        }
        up = sum(m.bytes_up_per_client for m in first.rounds) / n
        down = sum(m.bytes_down_per_client for m in first.rounds) / n
        return {
            "final_metric": first.final,
            # the same seed gives the same metrics in every repeat; this says whether it did
            "metric_same_in_every_repeat": all(
                [m.value(name) for m in r.rounds] == [m.value(name) for m in first.rounds]
                for r in results
            ),
            **{key: statistics.median(values) for key, values in samples.items()},
            "samples": samples,
            "seconds_per_round": per_round,
            "upload_bytes_per_client_round": up,
            "download_bytes_per_client_round": down,
            "upload_bytes_per_parameter": up / params,
            "download_bytes_per_parameter": down / params,
            "mlflow_run_id": first.mlflow_run_id,
            "output_dirs": [str(r.output_dir) for r in results],
        }

    p, h = side(runs.plain), side(runs.he)
    time_ratios = {key: _ratio(p["samples"][key], h["samples"][key]) for key in TIMES}
    # Round by round (the first repeat): one round slowed by something outside the job moves
    # the sum, not the median of the rounds' own ratios.
    round_ratios = [
        h_round.latency_seconds / p_round.latency_seconds
        for p_round, h_round in zip(plain.rounds, he.rounds, strict=True)
        if p_round.latency_seconds > 0
    ]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "job": plain.config.to_dict(),
        "metric": {"name": name, "higher_is_better": plain.config.headline_higher},
        "num_parameters": params,
        "repeats": len(runs.plain),
        "first_in_each_repeat": runs.order,
        "plain": p,
        "he": h,
        "rounds": rounds,
        "max_abs_difference_points": max(abs(r["difference_points"]) for r in rounds),
        "max_abs_floor_points": (
            max(abs(r["floor_points"]) for r in rounds) if float64_run is not None else None
        ),
        "ratios": {
            "simulated_wall_time": time_ratios["simulated_wall_seconds"]["median"],
            "deployment_latency": time_ratios["deployment_latency_seconds"]["median"],
            "deployment_latency_median_round": (
                statistics.median(round_ratios) if round_ratios else None
            ),
            "run_time": time_ratios["run_seconds"]["median"],
            "upload_bytes": h["upload_bytes_per_client_round"] / p["upload_bytes_per_client_round"],
            "download_bytes": h["download_bytes_per_client_round"]
            / p["download_bytes_per_client_round"],
        },
        "time_ratios": time_ratios,
        "latency_round_ratios": round_ratios,
        "bytes_per_parameter": _bytes_explained(params, h, keys_dir, he.config),
        "memory_mb": memory,
        "machine": machine(),
    }


def _evaluated(metrics: dict[str, float]) -> dict[str, float]:
    """A round's evaluation metrics of the task (its training metrics left out)."""
    return {k: v for k, v in metrics.items() if not k.startswith("train_")}


def _what(job: dict[str, Any]) -> str:
    """What the job trains: the built-in task's model and dataset, or the user's task."""
    if job.get("task"):
        return f"task `{job['task']}`"
    return f"{job['model']} on {job['dataset']}"


def _value(value: float | None, spec: str = ".4f") -> str:
    """A metric in a table: ``-`` where no site reported it."""
    return "-" if value is None or value != value else format(value, spec)


def _points(plain: float | None, he: float | None) -> str:
    if plain is None or he is None or plain != plain or he != he:
        return "-"
    return f"{100 * (he - plain):+.2f} points"


def _series(report: dict[str, Any], key: str) -> list[float]:
    """A headline column per round for a plot (NaN where not reported: a gap)."""
    return [math.nan if r[key] is None else r[key] for r in report["rounds"]]


def _task_metrics(report: dict[str, Any]) -> list[str]:
    """The task's evaluation metrics other than the headline one, which has its own column."""
    names = report["rounds"][0]["plain_metrics"] if report["rounds"] else {}
    return [name for name in names if name != report["metric"]["name"]]


def _ratio(plain: list[float], he: list[float]) -> dict[str, Any]:
    """HE / plaintext for one time figure: the ratio of medians, the range of the repeats'
    own ratios, and whether it is within noise.

    Within noise: below 1.0 (HE only adds work to a round, so HE measuring faster is noise),
    or, with repeats, a range of per-repeat ratios that reaches 1.0."""
    median = statistics.median(he) / statistics.median(plain)
    each = [h / p for p, h in zip(plain, he, strict=True)]
    low, high = min(each), max(each)
    within_noise = median < 1.0 or (len(each) > 1 and low <= 1.0)
    return {"median": median, "low": low, "high": high, "within_noise": within_noise}


def _ratio_text(ratio: dict[str, Any], repeats: int) -> str:
    """A ratio as the report prints it; one below 1.0 is never printed without its caveat."""
    spread = f" (repeats {ratio['low']:.2f}-{ratio['high']:.2f}x)" if repeats > 1 else ""
    text = f"{ratio['median']:.2f}x{spread}"
    if ratio["median"] < 1.0:
        measured = "" if repeats > 1 else ", one repeat: noise not measured"
        return f"{text}, within noise{measured}: no measurable HE overhead"
    if ratio["within_noise"]:
        return f"{text}, within noise"
    return text


def _bytes_explained(
    params: int, he: dict[str, Any], keys_dir: Path | None, config: RunConfig
) -> dict[str, Any]:
    """Why HE's bytes per parameter depend on the model's size: payloads are whole
    ciphertexts, and the ledger and the scale exchange come on top."""
    from secagg.crypto.packing import packing_for

    packing = packing_for(config.per_round, config.precision)

    degree, data_primes = 8192, 1
    if keys_dir is not None and (keys_dir / "manifest.json").exists():
        manifest = json.loads((keys_dir / "manifest.json").read_text())["params"]
        degree = int(manifest["poly_modulus_degree"])
        data_primes = len(manifest["coeff_mod_bit_sizes"]) - 1
    # a ciphertext travels as its c0 alone, N coefficients of 60 bits per data prime (its c1
    # is the payload's 32-byte seed)
    ciphertext = wire_nbytes(degree) * data_primes
    values = degree * packing.values_per_slot  # one packed slot per coefficient
    upload = he["upload_bytes_per_client_round"]
    return {
        "poly_modulus_degree": degree,
        "ciphertext_bytes": ciphertext,
        "values_per_ciphertext": values,
        "values_per_coefficient": packing.values_per_slot,
        "he_precision": config.precision,
        "asymptote": ciphertext / values,
        "update_ciphertexts_at_least": math.ceil(params / values) if params else 0,
        "upload_in_ciphertexts": upload / ciphertext,
    }


def to_markdown(report: dict[str, Any]) -> str:
    p, h, r = report["plain"], report["he"], report["ratios"]
    job, metric = report["job"], report["metric"]["name"]
    better = "higher" if report["metric"]["higher_is_better"] else "lower"
    lines = [
        f"# HE vs plaintext FedAvg — {report['date']}",
        "",
        f"Job `{job['job_name']}`: {_what(job)} "
        f"({report['num_parameters']:,} parameters), {job['clients']} clients, {job['rounds']} "
        f"rounds, alpha {job['alpha']}, seed {job['seed']}, server optimizer "
        f"{_optimizer_text(job)}. Machine: "
        f"{report['machine']['cpu_count']} CPUs, {report['machine'].get('device', 'cpu')}.",
        "",
        _timing_method(report),
        "",
        "| figure | plaintext | HE | HE / plaintext |",
        "| --- | ---: | ---: | ---: |",
        f"| final {metric} | {_value(p['final_metric'])} | {_value(h['final_metric'])} | "
        f"{_points(p['final_metric'], h['final_metric'])} |",
    ]
    repeats = report["repeats"]
    for key, name in TIMES.items():
        ratio = _ratio_text(report["time_ratios"][key], repeats)
        lines.append(
            f"| {name} | {_seconds(p['samples'][key])} | {_seconds(h['samples'][key])} | {ratio} |"
        )
    if r.get("deployment_latency_median_round") is not None:
        each = report["latency_round_ratios"]
        lines.append(
            "| deployment round latency, median of the rounds' own ratios (first repeat; "
            f"rounds {min(each):.2f}-{max(each):.2f}x) | | | "
            f"{r['deployment_latency_median_round']:.2f}x |"
        )
    lines += [
        f"| upload per client per round | {_mb(p['upload_bytes_per_client_round'])} | "
        f"{_mb(h['upload_bytes_per_client_round'])} | {r['upload_bytes']:.2f}x |",
        f"| download per client per round | {_mb(p['download_bytes_per_client_round'])} | "
        f"{_mb(h['download_bytes_per_client_round'])} | {r['download_bytes']:.2f}x |",
        f"| upload bytes per parameter | {p['upload_bytes_per_parameter']:.2f} | "
        f"{h['upload_bytes_per_parameter']:.2f} | |",
        f"| download bytes per parameter | {p['download_bytes_per_parameter']:.2f} | "
        f"{h['download_bytes_per_parameter']:.2f} | |",
        "",
        _bytes_text(report),
        "",
        "Time per round, summed over clients (seconds"
        + (", median of the repeats" if repeats > 1 else "")
        + "):",
        "",
        "| step | " + " | ".join(STEPS) + " |",
        "| --- |" + " ---: |" * len(STEPS),
    ]
    for label, side in (("plaintext", p), ("HE", h)):
        cells = " | ".join(f"{side['seconds_per_round'][s]:.3f}" for s in STEPS)
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        f"{metric} per round ({better} is better; a point is a hundredth of it). The last"
        " column is the floor: plaintext FedAvg against itself, with its updates sent as"
        " float64 instead of float32, a change at the level of float32 rounding.",
        "",
        "| round | plaintext | HE | HE − plaintext (points) | float64 − float32 plaintext |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rounds"]:
        floor = row["floor_points"]
        lines.append(
            f"| {row['round']} | {_value(row['plain_metric'])} | {_value(row['he_metric'])} | "
            f"{_value(row['difference_points'], '+.2f')} | "
            f"{'-' if floor is None else f'{floor:+.2f}'} |"
        )
    names = _task_metrics(report)
    if names:
        lines += [
            "",
            "The task's own metrics per round (averaged over the evaluating clients):",
            "",
            "| round | " + " | ".join(f"{n} plaintext | {n} HE" for n in names) + " |",
            "| ---: |" + " ---: | ---: |" * len(names),
        ]
        for row in report["rounds"]:
            cells = " | ".join(
                f"{row['plain_metrics'].get(n, float('nan')):.4f} | "
                f"{row['he_metrics'].get(n, float('nan')):.4f}"
                for n in names
            )
            lines.append(f"| {row['round']} | {cells} |")
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


def _optimizer_text(job: dict[str, Any]) -> str:
    """The job's server optimizer with its settings, e.g. ``fedadam (lr 0.01, tau 0.001)``."""
    name = job.get("server_optimizer", "fedavg")
    from secagg.optimizers import DEFAULT_SERVER_LR

    lr = job.get("server_lr") or DEFAULT_SERVER_LR[name]
    settings = [f"lr {lr:g}"]
    if name == "fedavgm":
        settings.append(f"momentum {job['server_momentum']:g}")
    elif name != "fedavg":
        settings += [f"beta1 {job['beta1']:g}", f"beta2 {job['beta2']:g}", f"tau {job['tau']:g}"]
    if job.get("fedprox_mu"):
        settings.append(f"FedProx mu {job['fedprox_mu']:g}")
    return f"{name} ({', '.join(settings)})"


def _mb(n: float) -> str:
    """Bytes in MB, or in kB below 0.1 MB (a small model's plaintext update is a few kB)."""
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _seconds(samples: list[float]) -> str:
    """A median with its range across repeats: ``12.3 s (12.1-12.9)``."""
    median = f"{statistics.median(samples):.1f} s"
    if len(samples) == 1:
        return median
    return f"{median} ({min(samples):.1f}-{max(samples):.1f})"


def _timing_method(report: dict[str, Any]) -> str:
    repeats = report["repeats"]
    first = ", ".join(
        "HE" if mode == "he" else "plaintext" for mode in report["first_in_each_repeat"]
    )
    if repeats == 1:
        how = "one timed pair (plaintext first); times are single measurements"
    else:
        how = (
            f"{repeats} timed pairs, alternating which went first ({first}); times are "
            "medians, with the range across repeats in brackets, and ratios are of the medians"
        )
    same = (
        report["plain"]["metric_same_in_every_repeat"]
        and report["he"]["metric_same_in_every_repeat"]
    )
    metric = report["metric"]["name"]
    repeated = (
        f"The {metric} was the same in every repeat (same seed)."
        if same
        else f"The {metric} differed between repeats; the first repeat's is shown."
    )
    return (
        f"Timing: an untimed warm-up round per mode, then {how}. A ratio below 1.0 is within "
        f"noise: HE only adds work to a round. {repeated}"
    )


def _bytes_text(report: dict[str, Any]) -> str:
    b, params = report["bytes_per_parameter"], report["num_parameters"]
    he = report["he"]["upload_bytes_per_parameter"]
    return (
        f"Why HE's {he:.2f} bytes per parameter depend on the model's size: a payload is whole "
        f"ciphertexts. At N = {b['poly_modulus_degree']:,} one ciphertext is "
        f"{b['ciphertext_bytes']:,} bytes (its c0, N coefficients of 60 bits; c1 is the "
        "payload's 32-byte seed) and "
        f"carries {b['values_per_ciphertext']:,} values (N coefficients x "
        f"{b['values_per_coefficient']} packed values, he_precision {b['he_precision']}), so no "
        f"model gets below {b['asymptote']:.2f} bytes per parameter. On top of the update come "
        "the ledger (a few slots in each payload) and the scale exchange (an encrypted "
        "histogram per block of 4,096 values, itself at least one whole ciphertext per round). "
        f"Here {params:,} parameters need at least {b['update_ciphertexts_at_least']} "
        f"ciphertext(s) for the update, and a client uploads "
        f"{b['upload_in_ciphertexts']:.1f} ciphertexts' worth per round: a small model pays "
        "for partly empty ciphertexts and a fixed scale exchange, while a model of millions "
        "of parameters fills its ciphertexts and approaches the floor (3.5M parameters: "
        "2.61 standard with the encrypted evaluations, see bench/RESULTS.md). Plaintext "
        "sends 4 bytes (float32) "
        "per parameter plus a small envelope."
    )


def plot(report: dict[str, Any], path: Path) -> Path:
    """The job's metrics per round, stacked time per round, and bytes per client, side by
    side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, times, sizes) = plt.subplots(1, 3, figsize=(15, 4.2))
    rounds = [r["round"] for r in report["rounds"]]
    metric = report["metric"]["name"]
    acc.plot(rounds, _series(report, "plain_metric"), "o-", label=f"{metric}, plaintext")
    acc.plot(rounds, _series(report, "he_metric"), "s--", label=f"{metric}, HE")
    if report["rounds"][0]["float64_metric"] is not None:
        float64_run = _series(report, "float64_metric")
        acc.plot(rounds, float64_run, "^:", label=f"{metric}, plaintext, float64 updates")
    for name in _task_metrics(report):
        for key, style, label in (
            ("plain_metrics", "o-", "plaintext"),
            ("he_metrics", "s--", "HE"),
        ):
            values = [r[key].get(name, float("nan")) for r in report["rounds"]]
            acc.plot(rounds, values, style, label=f"{name}, {label}")
    acc.set(title="global test metrics", xlabel="round", ylabel=f"{metric} and task metrics")
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


def plot_metric(report: dict[str, Any], path: Path) -> Path:
    """The job's metric per round of the plaintext and HE runs (the MLflow parent's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r["round"] for r in report["rounds"]]
    ax.plot(rounds, _series(report, "plain_metric"), "o-", label="plaintext")
    ax.plot(rounds, _series(report, "he_metric"), "s--", label="HE")
    job, metric = report["job"], report["metric"]
    better = "higher" if metric["higher_is_better"] else "lower"
    ax.set(
        title=f"{job['job_name']}: {_what(job)}, {job['clients']} clients",
        xlabel="round",
        ylabel=f"global test {metric['name']} ({better} is better)",
    )
    ax.set_xticks(rounds)
    ax.legend()
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
    args.keys = keys_for(args.keys)
    config = job_config(args)
    repeats = args.repeats or (3 if args.quick else 1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs = run_all(config, out / "runs", stamp, repeats, not args.no_floor)
    memory = {} if args.no_memory else measure_memory(config, out / "runs" / f"{stamp}-memory")
    report = summarize(runs, memory, args.keys)
    markdown = to_markdown(report)
    paths = {
        "md": out / f"{stamp}.md",
        "json": out / f"{stamp}.json",
        "png": plot(report, out / f"{stamp}.png"),
        "metric_png": plot_metric(report, out / f"{stamp}-{config.headline}.png"),
    }
    if args.dp_epsilons:
        from bench import dp_axis

        epsilons = [float(e) for e in args.dp_epsilons.split(",")]
        parent = {"mlflow.parentRunId": runs.parent} if runs.parent else None
        adaptive = replace(config, dp_clip_quantile=args.dp_clip_quantile)
        dp_runs = dp_axis.run(adaptive, epsilons, args.dp_clip, out / "runs", stamp, print, parent)
        report["dp"] = dp_axis.summarize(dp_runs, runs.he[0])
        markdown += "\n\n" + dp_axis.to_markdown(report["dp"], config.headline)
        paths["dp_png"] = dp_axis.plot(
            report["dp"], config.headline, runs.plain[0].final, out / f"{stamp}-dp.png"
        )
        markdown += f"\n\n![metric against epsilon]({stamp}-dp.png)"
    paths["md"].write_text(markdown + f"\n![HE vs plaintext]({stamp}.png)\n")
    report["files"] = {k: str(v) for k, v in paths.items()}
    if runs.parent:
        report["mlflow"] = _links(config, runs)
    paths["json"].write_text(json.dumps(finite(report), indent=2, allow_nan=False))
    if runs.parent:
        _finish_parent(config, runs.parent, report, paths)
    print(markdown)
    print(f"report: {paths['md']}  figure: {paths['png']}", file=sys.stderr)
    if runs.parent:
        links = report["mlflow"]
        print(f"MLflow, HE vs plaintext side by side: {links['compare_url']}")
        print(f"MLflow, the benchmark's parent run:   {links['parent_url']}")
        if links["ui_command"]:
            print(f"start the UI first: {links['ui_command']}")
    return report


def _links(config: RunConfig, runs: Runs) -> dict[str, Any]:
    """The MLflow UI pages of the comparison."""
    from secagg.tracking import compare_url, run_url, ui_command

    plain, he = runs.plain[0], runs.he[0]
    uri, experiment = str(plain.tracking_uri), str(plain.mlflow_experiment_id)
    pair = [str(plain.mlflow_run_id), str(he.mlflow_run_id)]
    return {
        "tracking_uri": uri,
        "experiment_id": experiment,
        "parent_run_id": runs.parent,
        "run_ids": pair,
        "compare_url": compare_url(uri, experiment, pair),
        "parent_url": run_url(uri, experiment, str(runs.parent)),
        "ui_command": ui_command(uri),
    }


def _finish_parent(config: RunConfig, parent: str, report: dict[str, Any], paths: dict) -> None:
    from secagg.tracking import DESCRIPTION_TAG, MlflowTracker

    tracker = MlflowTracker(config.tracking_uri, config.experiment, run_id=parent)
    name = report["metric"]["name"]
    for row in report["rounds"]:
        tracker.log_round(
            row["round"],
            {
                f"plain_{name}": row["plain_metric"],
                f"he_{name}": row["he_metric"],
            },
        )
    tracker.log_round(
        0,
        {
            "ratio_simulated_wall_time": report["ratios"]["simulated_wall_time"],
            "ratio_deployment_latency": report["ratios"]["deployment_latency"],
            "ratio_run_time": report["ratios"]["run_time"],
            "ratio_upload_bytes": report["ratios"]["upload_bytes"],
            "he_upload_bytes_per_parameter": report["he"]["upload_bytes_per_parameter"],
            f"max_abs_{name}_difference_points": report["max_abs_difference_points"],
            **(
                {"max_abs_floor_points": report["max_abs_floor_points"]}
                if report["max_abs_floor_points"] is not None
                else {}
            ),
        },
    )
    tracker.set_tags({DESCRIPTION_TAG: _parent_description(report)})
    for path in paths.values():
        tracker.log_artifact(path)
    tracker.finish()


def _parent_description(report: dict[str, Any]) -> str:
    job, p, h = report["job"], report["plain"], report["he"]
    times = report["time_ratios"]
    return "\n".join(
        [
            f"**HE vs plaintext FedAvg**, job `{job['job_name']}`: {_what(job)} "
            f"({report['num_parameters']:,} parameters), {job['clients']} "
            f"clients, {job['rounds']} rounds; {report['repeats']} timed repeat(s).",
            "",
            f"- final {report['metric']['name']}: plaintext {_value(p['final_metric'])}, "
            f"HE {_value(h['final_metric'])}",
            f"- simulated wall time, HE / plaintext: "
            f"{_ratio_text(times['simulated_wall_seconds'], report['repeats'])}",
            f"- deployment round latency, HE / plaintext: "
            f"{_ratio_text(times['deployment_latency_seconds'], report['repeats'])}",
            f"- bytes per parameter, each way: plaintext {p['upload_bytes_per_parameter']:.2f}, "
            f"HE {h['upload_bytes_per_parameter']:.2f}",
            "",
            f"Compare the two runs: {report['mlflow']['compare_url']}",
        ]
    )


if __name__ == "__main__":
    main()
