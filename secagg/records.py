"""What a run leaves behind, for the in-process runner and the network server alike.

A run folder holds ``results.json`` (the config and every round's metrics, rewritten after each
round), ``state.json`` and ``aggregates/`` (the checkpoint chain, see ``secagg.server``), and one
MLflow run holds the same metrics. ``RunRecords`` keeps all three in step after every round and
resumes them from the folder of an interrupted run. Nothing here imports torch: the network
server uses it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secagg import keys as keyfiles
from secagg import rounds
from secagg.config import RunConfig
from secagg.errors import CheckpointError
from secagg.files import atomic_write_json
from secagg.rounds import RoundAggregates, RoundFailed, RoundMetrics
from secagg.server import AGGREGATES_DIR, STATE_FILE, Checkpoint, Server, load_checkpoint
from secagg.tracking import Tracker, make_tracker
from secagg.transport import Transport

RESULTS_FILE = "results.json"


@dataclass
class RunResult:
    """What a finished (or resumed and finished) job produced."""

    config: RunConfig
    output_dir: Path
    rounds: list[RoundMetrics]
    num_parameters: int | None
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

    @classmethod
    def from_dict(cls, data: dict[str, Any], output_dir: Path) -> RunResult:
        """Inverse of ``to_dict``: a run's result read back from its ``results.json``."""
        mlflow = data.get("mlflow", {})
        return cls(
            RunConfig(**data["config"]),
            output_dir,
            [RoundMetrics.from_dict(m) for m in data["rounds"]],
            data.get("num_parameters"),
            mlflow.get("tracking_uri"),
            mlflow.get("run_id"),
            float(data.get("seconds", 0.0)),
        )


def new_output_dir(config: RunConfig) -> Path:
    """``runs/<time>-<job>-<he|plain>`` unless the config names one."""
    if config.output_dir:
        return Path(config.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.job_name}-{'he' if config.he else 'plain'}"


def check_new_output(output: Path) -> None:
    """Refuse ``output`` as a new run's folder unless it is new or empty. A run writes
    ``results.json``, ``model.pt`` and more there, so any other folder (the user's own
    ``results.json`` and ``model.pt``, say) would be overwritten silently. One exception: a
    folder holding only ``aggregates/``, what a server stopped before its first round left."""
    if not output.exists():
        return
    if not output.is_dir():
        raise CheckpointError(f"{output} is a file, not a folder; choose another output folder")
    if (output / STATE_FILE).exists():
        raise CheckpointError(
            f"{output}/ already holds a run; pass --resume to continue it "
            "or choose another --output"
        )
    held = sorted(entry.name for entry in output.iterdir())
    if held and held != [AGGREGATES_DIR]:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise CheckpointError(
            f"{output}/ exists and is not a run folder (it holds {shown}); a run writes "
            "results.json and model.pt there and would overwrite them: choose a new or empty "
            "folder"
        )


def latest_run_dir(root: str | Path = "runs") -> Path:
    """The most recently modified run directory under ``root`` (for --resume without --output)."""
    candidates = sorted(Path(root).glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no run to resume under {root}/; pass --output DIR of the run")
    return candidates[-1].parent


class RunRecords:
    """The run folder, checkpoint chain and MLflow run of one job, kept in step."""

    def __init__(
        self,
        config: RunConfig,
        output: Path,
        checkpoint: Checkpoint | None,
        tags: Mapping[str, str],
    ) -> None:
        self.started = time.perf_counter()
        self.config = config
        self.output = output
        #: the checkpoint this run resumes from, if any
        self.resumed = checkpoint
        self.tags = dict(tags)
        #: every payload of this run carries its id, so nothing from another run is added
        self.job_id = checkpoint.job_id if checkpoint is not None else os.urandom(16)
        state = checkpoint.state if checkpoint is not None else {}
        history = [RoundMetrics.from_dict(m) for m in state.get("history", [])]
        self.result = RunResult(config, output, history, None, None, state.get("mlflow_run_id"))
        self.tracker: Tracker | None = None

    def start(self, num_parameters: int | None) -> None:
        """Create the run folder and start (or, resuming, reopen) the MLflow run."""
        config, result = self.config, self.result
        self.output.mkdir(parents=True, exist_ok=True)
        self.tracker = make_tracker(
            config.tracking, config.tracking_uri, config.experiment, result.mlflow_run_id
        )
        run_tags = {**_tags(config), **self.tags}
        params = _params(config, num_parameters)
        result.mlflow_run_id = self.tracker.start(params, run_tags, self.output.name)
        result.tracking_uri = getattr(self.tracker, "tracking_uri", None)
        result.num_parameters = num_parameters

    @classmethod
    def open(
        cls,
        config: RunConfig,
        resume_dir: str | Path | None,
        tags: Mapping[str, str] = {},
        num_parameters: int | None = None,
    ) -> RunRecords:
        """A new run's records, or those of the interrupted run in ``resume_dir``."""
        if resume_dir is None:
            output = new_output_dir(config)
            check_new_output(output)
            return cls(config, output, None, tags)
        checkpoint = load_checkpoint(resume_dir)
        saved = RunConfig(**{**checkpoint.state["config"], "output_dir": str(resume_dir)})
        return cls(saved.validate(), Path(resume_dir), checkpoint, tags)

    @property
    def first_round(self) -> int:
        return self.resumed.round_num + 1 if self.resumed is not None else 1

    def run_rounds(
        self,
        server: Server,
        transport: Transport,
        on_round: Callable[[RoundMetrics], None] = lambda m: None,
        on_retry: Callable[[int, RoundFailed], None] = lambda r, err: None,
    ) -> list[RoundMetrics]:
        """Run the job's remaining rounds, keeping the checkpoint (before any client applies a
        round), results.json and MLflow in step; mark the MLflow run failed if a round raises."""

        def checkpoint(round_num: int, aggregates: RoundAggregates) -> None:
            server.checkpoint(round_num, aggregates.update, aggregates.scales, self._state())

        def after_round(metrics: RoundMetrics) -> None:
            self.after_round(server, metrics)
            on_round(metrics)

        span = range(self.first_round, self.config.rounds + 1)
        retries = self.config.round_retries
        try:
            return rounds.run(
                server, transport, self.job_id, span, after_round, checkpoint, retries, on_retry
            )
        except BaseException:
            self.fail()
            raise

    def after_round(self, server: Server, metrics: RoundMetrics) -> None:
        """Record a finished round's metrics everywhere."""
        self.result.rounds.append(metrics)
        server.save_state({**self._state(), "round": metrics.round})
        self._tracker().log_round(metrics.round, _tracked(metrics))
        self.result.seconds = time.perf_counter() - self.started
        atomic_write_json(self.output / RESULTS_FILE, self.result.to_dict())

    def _state(self) -> dict[str, object]:
        return {
            "config": self.config.to_dict(),
            "history": [m.to_dict() for m in self.result.rounds],
            "job_id": self.job_id.hex(),
            "mlflow_run_id": self.result.mlflow_run_id,
        }

    def finish(self, artifacts: list[Path] = []) -> RunResult:  # noqa: B006  (never mutated)
        """Write the final results and close the MLflow run."""
        self.result.seconds = time.perf_counter() - self.started
        atomic_write_json(self.output / RESULTS_FILE, self.result.to_dict())
        tracker = self._tracker()
        for path in [self.output / RESULTS_FILE, *artifacts]:
            tracker.log_artifact(path)
        tracker.finish("FINISHED")
        return self.result

    def fail(self, status: str = "KILLED") -> None:
        if self.tracker is not None:
            self.tracker.finish(status)

    def _tracker(self) -> Tracker:
        if self.tracker is None:
            raise RuntimeError("RunRecords.start() was not called")
        return self.tracker


def _params(config: RunConfig, num_parameters: int | None) -> dict[str, Any]:
    params = config.to_dict()
    if num_parameters is not None:
        params["num_parameters"] = num_parameters
    if config.he:
        manifest = keyfiles.read_manifest(config.keys_dir)
        params["key_fingerprint"] = manifest["fingerprint"]
        params["ckks"] = json.dumps(manifest["params"])
    return params


def _tags(config: RunConfig) -> dict[str, str]:
    return {"he": str(config.he).lower(), "job": config.job_name, "dataset": config.dataset}


def _tracked(metrics: RoundMetrics) -> dict[str, float]:
    """A round's metrics as MLflow series: every number, and each of the task's own metrics
    under its name (``task_<name>`` where that name is one of secagg's and means another thing)."""
    values = dataclasses.asdict(metrics)
    values.pop("round")
    own: dict[str, float] = values.pop("metrics")
    for name, value in own.items():
        if name not in values:
            values[name] = value
        elif values[name] != value:
            values[f"task_{name}"] = value
    return values
