"""A whole federated job from a RunConfig: build parties, run rounds, record results.

This is the library entry point behind ``secagg run``. It does not print; pass ``on_round`` to
see progress.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secagg import crypto, rounds
from secagg import keys as keyfiles
from secagg.client import Client, TrainSettings
from secagg.config import RunConfig
from secagg.crypto import ClientCipher
from secagg.data import Dataset, dirichlet_partition, load_dataset
from secagg.errors import CheckpointError, ConfigError
from secagg.files import atomic_write, atomic_write_json
from secagg.models import build_model
from secagg.rounds import RoundAggregates, RoundMetrics
from secagg.server import Server, load_checkpoint
from secagg.tracking import make_tracker
from secagg.transport.inprocess import InProcessTransport

RESULTS_FILE = "results.json"
MODEL_FILE = "model.pt"


@dataclass
class RunResult:
    """What a finished (or resumed and finished) job produced."""

    config: RunConfig
    output_dir: Path
    rounds: list[RoundMetrics]
    num_parameters: int
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].accuracy if self.rounds else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "num_parameters": self.num_parameters,
            "final_accuracy": self.final_accuracy,
            "seconds": self.seconds,
            "mlflow": {"tracking_uri": self.tracking_uri, "run_id": self.mlflow_run_id},
            "rounds": [m.to_dict() for m in self.rounds],
        }


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    return device


def build_clients(
    config: RunConfig, dataset: Dataset, make_cipher: Callable[[], ClientCipher]
) -> list[Client]:
    """One client per Dirichlet shard; every client starts from the same seeded model."""
    shards = dirichlet_partition(
        dataset.train.y.numpy(),
        config.clients,
        config.alpha,
        config.seed,
        config.min_client_samples,
    )
    device = resolve_device(config.device)
    settings = TrainSettings(
        config.local_epochs,
        config.batch_size,
        config.optimizer,
        config.lr,
        config.momentum,
        config.seed,
    )
    return [
        Client(
            client_id=i,
            model=build_model(config.model, dataset.in_shape, dataset.classes, config.seed),
            train=dataset.train.subset(shard),
            test=dataset.test,
            cipher=make_cipher(),
            settings=settings,
            device=device,
        )
        for i, shard in enumerate(shards)
    ]


def new_output_dir(config: RunConfig) -> Path:
    """``runs/<time>-<job>-<he|plain>`` unless the config names one."""
    if config.output_dir:
        return Path(config.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.job_name}-{'he' if config.he else 'plain'}"


def latest_run_dir(root: str | Path = "runs") -> Path:
    """The most recently modified run directory under ``root`` (for --resume without --output)."""
    candidates = sorted(Path(root).glob("*/state.json"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no run to resume under {root}/; pass --output DIR of the run")
    return candidates[-1].parent


def run_job(
    config: RunConfig,
    *,
    resume_dir: str | Path | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
    tags: dict[str, str] | None = None,
    reverse_arrivals: bool = False,
) -> RunResult:
    """Run a job (or continue the interrupted one in ``resume_dir``); return its result.

    ``tags`` are added to the MLflow run (``mlflow.parentRunId`` nests it under another run).
    ``reverse_arrivals`` hands the server the updates in reverse roster order (benchmarks).
    """
    started = time.perf_counter()
    history: list[RoundMetrics] = []
    run_id = None
    checkpoint = None
    # Every payload of this run carries its id, so nothing from another run is ever added.
    job_id = os.urandom(16)
    if resume_dir is not None:
        checkpoint = load_checkpoint(resume_dir)
        saved = checkpoint.state["config"]
        config = RunConfig(**{**saved, "output_dir": str(resume_dir)})
        history = [RoundMetrics(**m) for m in checkpoint.state.get("history", [])]
        run_id = checkpoint.state.get("mlflow_run_id")
        job_id = checkpoint.job_id
    config.validate()
    output = Path(resume_dir) if resume_dir is not None else new_output_dir(config)
    if resume_dir is None and (output / "state.json").exists():
        raise CheckpointError(
            f"{output}/ already holds a run; pass --resume to continue it "
            "or choose another --output"
        )

    dataset = load_dataset(config.dataset, config.data_dir, config.download)
    server = Server(crypto.for_server(config), output)
    clients = build_clients(config, dataset, crypto.for_client(config))
    transport = InProcessTransport(clients, reverse=reverse_arrivals)
    num_parameters = sum(p.numel() for p in clients[0].model.parameters())

    output.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(config.tracking, config.tracking_uri, config.experiment, run_id)
    run_tags = {**_tags(config), **(tags or {})}
    run_id = tracker.start(_params(config, num_parameters), run_tags, output.name)
    result = RunResult(
        config, output, history, num_parameters, getattr(tracker, "tracking_uri", None), run_id
    )

    first = 1
    if checkpoint is not None:
        # Replay the aggregates to rebuild the global model every client held, then go on.
        for round_num in range(1, checkpoint.round_num + 1):
            stamp = rounds.round_stamp(job_id, round_num, transport.roster)
            transport.apply(stamp, *checkpoint.aggregates(round_num))
        first = checkpoint.round_num + 1

    def after_round(metrics: RoundMetrics, aggregates: RoundAggregates) -> None:
        history.append(metrics)
        state: dict[str, object] = {
            "config": config.to_dict(),
            "history": [m.to_dict() for m in history],
            "job_id": job_id.hex(),
            "mlflow_run_id": run_id,
        }
        server.checkpoint(metrics.round, aggregates.update, aggregates.scales, state)
        tracker.log_round(metrics.round, _tracked(metrics))
        result.seconds = time.perf_counter() - started
        atomic_write_json(output / RESULTS_FILE, result.to_dict())
        if on_round is not None:
            on_round(metrics)

    try:
        rounds.run(server, transport, job_id, range(first, config.rounds + 1), after_round)
    except BaseException:
        tracker.finish("KILLED")
        raise
    result.seconds = time.perf_counter() - started
    model_path = _save_model(clients[0], output / MODEL_FILE)
    atomic_write_json(output / RESULTS_FILE, result.to_dict())
    tracker.log_artifact(output / RESULTS_FILE)
    tracker.log_artifact(model_path)
    tracker.finish("FINISHED")
    return result


def _save_model(client: Client, path: Path) -> Path:
    """The decrypted global model as a float32 state dict (temp file, then rename)."""
    import io

    buffer = io.BytesIO()
    state = {k: v.detach().to("cpu") for k, v in client.model.state_dict().items()}
    torch.save(state, buffer)
    return atomic_write(path, buffer.getvalue())


def _params(config: RunConfig, num_parameters: int) -> dict[str, Any]:
    params = config.to_dict()
    params["num_parameters"] = num_parameters
    if config.he:
        manifest = keyfiles.read_manifest(config.keys_dir)
        params["key_fingerprint"] = manifest["fingerprint"]
        params["ckks"] = json.dumps(manifest["params"])
    return params


def _tags(config: RunConfig) -> dict[str, str]:
    return {"he": str(config.he).lower(), "job": config.job_name, "dataset": config.dataset}


def _tracked(metrics: RoundMetrics) -> dict[str, float]:
    values = dataclasses.asdict(metrics)
    values.pop("round")
    return values
