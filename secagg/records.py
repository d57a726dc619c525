"""What a run leaves behind, for the in-process runner and the network server alike.

A run folder holds ``results.json`` (the config and every round's metrics, rewritten after each
round), ``state.json`` and ``aggregates/`` (the checkpoint chain, see ``secagg.server``), and one
MLflow run holds the same metrics. ``RunRecords`` keeps all three in step after every round and
resumes them from the folder of an interrupted run. Nothing here imports torch: the network
server uses it too.

A run's duration is defined here once: ``seconds`` is the wall time from opening the records
(before the clients are built) to ``finish``, summed over the sessions of a resumed run (up to
its last recorded round). results.json's ``seconds``, the CLI's ``done: ... in Xs`` and MLflow's
``run_seconds`` metric are that one value; for an uninterrupted run MLflow's own Duration column
agrees too (the run is created and closed with those times).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from secagg import rounds
from secagg.config import RunConfig
from secagg.errors import ConfigError
from secagg.files import atomic_write_json
from secagg.labels import description, mlflow_params, run_name, tags_for, tracked
from secagg.outputs import RESULTS_FILE, check_new_output, new_output_dir
from secagg.resume import plan_resume
from secagg.rounds import RoundAggregates, RoundFailed, RoundMetrics
from secagg.server import Checkpoint, Server, load_checkpoint
from secagg.tracking import DESCRIPTION_TAG, Tracker, make_tracker
from secagg.transport import Progress, Transport, no_progress


@dataclass
class RunResult:
    """What a finished (or resumed and finished) job produced."""

    config: RunConfig
    output_dir: Path
    rounds: list[RoundMetrics]
    num_parameters: int | None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    #: wall time of the run, see the module docstring
    seconds: float = 0.0
    mlflow_experiment_id: str | None = None
    #: the MLflow run's name: mode, job and clients first (``he-digits-8c-...``)
    run_name: str | None = None
    #: why the run failed (None: it did not)
    failure: str | None = None
    #: the class of the task's model, when known
    model_class: str | None = None

    @property
    def final(self) -> float:
        """The job's headline metric after its last round (NaN when no site reported it)."""
        return self.rounds[-1].value(self.config.headline) if self.rounds else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "num_parameters": self.num_parameters,
            # the headline metric, by name: null when no site reported it
            "metric": {
                "name": self.config.headline,
                "higher_is_better": self.config.headline_higher,
                "final": self.final,
            },
            "seconds": self.seconds,
            "mlflow": {
                "tracking_uri": self.tracking_uri,
                "experiment_id": self.mlflow_experiment_id,
                "run_id": self.mlflow_run_id,
                "run_name": self.run_name,
            },
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
            mlflow.get("experiment_id"),
            mlflow.get("run_name"),
        )

    @property
    def bytes_per_parameter(self) -> tuple[float, float] | None:
        """Mean bytes each client sent and received per parameter per round (None unknown)."""
        if not self.rounds or not self.num_parameters:
            return None
        n, params = len(self.rounds), self.num_parameters
        up = sum(m.bytes_up_per_client for m in self.rounds) / n
        down = sum(m.bytes_down_per_client for m in self.rounds) / n
        return up / params, down / params


class RunRecords:
    """The run folder, checkpoint chain and MLflow run of one job, kept in step."""

    def __init__(
        self,
        config: RunConfig,
        output: Path,
        checkpoint: Checkpoint | None,
        tags: Mapping[str, str],
    ) -> None:
        #: this session's start: epoch seconds (MLflow's clock) and the monotonic clock
        self.started_at = time.time()
        self._clock = time.perf_counter()
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
        #: seconds the earlier sessions of a resumed run took, up to its last recorded round
        self.earlier_seconds = float(state.get("seconds", 0.0))
        self.result.run_name = state.get("run_name")
        self.tracker: Tracker | None = None
        self._description = ""
        self._warned = False

    def elapsed(self) -> float:
        """The run's duration so far (see the module docstring)."""
        return self.earlier_seconds + time.perf_counter() - self._clock

    def start(self, num_parameters: int | None) -> None:
        """Create the run folder and start (or, resuming, reopen) the MLflow run."""
        config, result = self.config, self.result
        self.output.mkdir(parents=True, exist_ok=True)
        self.tracker = make_tracker(config.tracking_settings, result.mlflow_run_id)
        result.num_parameters = num_parameters
        self._description = description(result)
        run_tags = {**tags_for(config), **self.tags, DESCRIPTION_TAG: self._description}
        params = mlflow_params(config, num_parameters)
        # a resumed run keeps the name MLflow knows it by
        result.run_name = result.run_name or run_name(config, self.started_at)
        result.mlflow_run_id = self.tracker.start(
            params, run_tags, result.run_name, start_time=self.started_at
        )
        result.tracking_uri = getattr(self.tracker, "tracking_uri", None)
        result.mlflow_experiment_id = self.tracker.experiment_id

    @classmethod
    def open(
        cls,
        config: RunConfig,
        resume_dir: str | Path | None,
        tags: Mapping[str, str] = {},
        num_parameters: int | None = None,
        changes: Mapping[str, Any] = {},
    ) -> RunRecords:
        """A new run's records, or those of the interrupted run in ``resume_dir`` (with the
        ``changes`` that ``plan_resume`` allows)."""
        if resume_dir is None:
            check_budget(config)
            output = new_output_dir(config.tracking_settings)
            check_new_output(output)
            return cls(config, output, None, tags)
        plan = plan_resume(resume_dir, changes)
        return cls(plan.config, Path(resume_dir), load_checkpoint(resume_dir), tags)

    @property
    def first_round(self) -> int:
        return self.resumed.round_num + 1 if self.resumed is not None else 1

    def run_rounds(
        self,
        server: Server,
        transport: Transport,
        on_round: Callable[[RoundMetrics], None] = lambda m: None,
        on_retry: Callable[[int, RoundFailed], None] = lambda r, err: None,
        on_progress: Progress = no_progress,
    ) -> list[RoundMetrics]:
        """Run the job's remaining rounds, keeping the checkpoint (before any client applies a
        round), results.json and MLflow in step; mark the MLflow run failed if a round raises."""

        def checkpoint(round_num: int, aggregates: RoundAggregates) -> None:
            server.checkpoint(
                round_num,
                aggregates.update,
                aggregates.scales,
                self._state(),
                encrypted=self.config.he,
                attempt=aggregates.attempt,
            )

        def after_round(metrics: RoundMetrics) -> None:
            if self.config.dp:
                metrics = replace(metrics, epsilon=self.config.epsilon_after(metrics.round))
            self.after_round(server, metrics)
            on_round(metrics)

        span = range(self.first_round, self.rounds_within_budget() + 1)
        retries = self.config.transport_settings.round_retries
        try:
            return rounds.run(
                server,
                transport,
                self.job_id,
                span,
                after_round,
                checkpoint,
                retries,
                on_retry,
                on_progress,
            )
        except BaseException as err:
            self.fail(err)
            raise

    def rounds_within_budget(self) -> int:
        """The last round the job's privacy budget allows (its ``rounds`` without one); a
        warning says so when that is fewer."""
        config = self.config
        if not config.dp or not config.dp_epsilon:
            return config.rounds
        within = config.dp_epsilon * (1 + 1e-9)
        low, high = 0, config.rounds  # epsilon grows with the rounds: the last within it
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (
                (middle, high) if config.epsilon_after(middle) <= within else (low, middle - 1)
            )
        last = low
        if last < config.rounds:
            warnings.warn(
                f"the privacy budget (epsilon {config.dp_epsilon} at delta {config.dp_delta}) "
                f"allows {last} of the job's {config.rounds} rounds at noise multiplier "
                f"{config.noise_multiplier():.3f}: the run stops after round {last}",
                stacklevel=2,
            )
        return last

    def after_round(self, server: Server, metrics: RoundMetrics) -> None:
        """Record a finished round's metrics everywhere."""
        self._check_headline(metrics)
        self.result.rounds.append(metrics)
        server.save_state({**self._state(), "round": metrics.round})
        self._tracker().log_round(metrics.round, tracked(metrics))
        self._describe()
        self.result.seconds = self.elapsed()
        atomic_write_json(self.output / RESULTS_FILE, self.result.to_dict())

    def claim(self, server: Server) -> None:
        """Record the run as it stands, before any site hears of it: a server restarted
        before its first round was checkpointed resumes this job (its id, and once started
        its MLflow run), not a new one that its sites, whose mask keys are signed for this
        job, would not recognize."""
        self.output.mkdir(parents=True, exist_ok=True)
        server.save_state({**self._state(), "round": self.first_round - 1})

    def _check_headline(self, metrics: RoundMetrics) -> None:
        """Warn once when the sites evaluated but none reported the job's headline metric."""
        name = self.config.headline
        reported = sorted(k for k in metrics.metrics if not k.startswith("train_"))
        if name == "loss" or not reported or name in reported or self._warned:
            return
        self._warned = True
        warnings.warn(
            f"the job's metric '{name}' is not one its task reports ({', '.join(reported)}): "
            f'set metric = "{reported[0]}" in the job file (or --metric)',
            stacklevel=2,
        )

    def _describe(self) -> None:
        """Rewrite the MLflow description when it says more (bytes per parameter once known)."""
        text = description(self.result)
        if text != self._description:
            self._tracker().set_tags({DESCRIPTION_TAG: text})
            self._description = text

    def _state(self) -> dict[str, object]:
        return {
            "config": self.config.to_dict(),
            "history": [m.to_dict() for m in self.result.rounds],
            "job_id": self.job_id.hex(),
            "mlflow_run_id": self.result.mlflow_run_id,
            "run_name": self.result.run_name,
            "seconds": self.elapsed(),
        }

    def finish(self, artifacts: list[Path] = []) -> RunResult:  # noqa: B006  (never mutated)
        """Write the final results and close the MLflow run; its duration is taken here."""
        session = time.perf_counter() - self._clock
        self.result.seconds = self.earlier_seconds + session
        atomic_write_json(self.output / RESULTS_FILE, self.result.to_dict())
        tracker = self._tracker()
        self._describe()
        last_round = self.result.rounds[-1].round if self.result.rounds else 0
        tracker.log_round(last_round, {"run_seconds": self.result.seconds})
        for path in [self.output / RESULTS_FILE, *artifacts]:
            tracker.log_artifact(path)
        tracker.finish("FINISHED", end_time=self.started_at + session)
        return self.result

    def fail(self, err: BaseException | str) -> None:
        """Close the MLflow run as FAILED with the reason in its description and a
        ``failure`` tag (KILLED when the user interrupted it)."""
        if self.tracker is None:
            return
        interrupted = isinstance(err, KeyboardInterrupt)
        reason = "interrupted by the user" if interrupted else str(err) or type(err).__name__
        self.result.failure = reason.splitlines()[0][:500]
        try:
            self.tracker.set_tags({"failure": self.result.failure})
            self._describe()
        finally:
            self.tracker.finish("KILLED" if interrupted else "FAILED")

    def _tracker(self) -> Tracker:
        if self.tracker is None:
            raise RuntimeError("RunRecords.start() was not called")
        return self.tracker


def check_budget(config: RunConfig) -> None:
    """Refuse (ConfigError) a DP job whose privacy budget does not cover one round at its
    noise multiplier: it would train nothing."""
    if not config.dp or not config.dp_epsilon:
        return
    one = config.epsilon_after(1)
    if one > config.dp_epsilon * (1 + 1e-9):
        raise ConfigError(
            f"the privacy budget (epsilon {config.dp_epsilon:g} at delta {config.dp_delta:g}) "
            f"does not cover one round at noise multiplier {config.noise_multiplier():.3g} "
            "(one round spends "
            f"{one:.3g}): raise dp_epsilon, or raise dp_noise (or leave it out to calibrate it)"
        )
