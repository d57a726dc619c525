"""Experiment tracking: MLflow when enabled, a no-op otherwise.

MLflow is imported only when a run is tracked (it takes seconds to import). The round loop
never calls the tracker; the job hands it each round's metrics after the round is done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from secagg.config import TrackingSettings
from secagg.errors import ConfigError

#: the tag MLflow's UI shows as a run's description (markdown)
DESCRIPTION_TAG = "mlflow.note.content"
#: where ``mlflow ui`` serves by default
LOCAL_UI = "http://127.0.0.1:5000"


class Tracker(Protocol):
    run_id: str | None
    experiment_id: str | None

    def start(
        self,
        params: dict[str, Any],
        tags: dict[str, str],
        run_name: str,
        start_time: float | None = None,
    ) -> str | None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_round(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def finish(self, status: str = "FINISHED", end_time: float | None = None) -> None: ...


class NullTracker:
    """Used with --no-tracking: records nothing."""

    run_id: str | None = None
    experiment_id: str | None = None

    def start(
        self,
        params: dict[str, Any],
        tags: dict[str, str],
        run_name: str,
        start_time: float | None = None,
    ) -> str | None:
        return None

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str = "FINISHED", end_time: float | None = None) -> None:
        pass


class MlflowTracker:
    """Logs one secagg run as one MLflow run: params, tags, per-round metrics, artifacts.

    With ``run_id`` given (a resumed job) it continues that MLflow run instead of starting one.
    """

    def __init__(
        self, tracking_uri: str | None, experiment: str, run_id: str | None = None
    ) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        # MLflow and alembic log schema migrations at INFO on first use of a store.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        try:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id: str | None = (
                found.experiment_id if found else self.client.create_experiment(experiment)
            )
        except Exception as err:  # MLflow raises many kinds for an unreachable store
            raise ConfigError(
                f"cannot use MLflow tracking store {self.tracking_uri}: {err}; "
                "check --tracking-uri or pass --no-tracking"
            ) from err
        self.run_id = run_id

    def start(
        self,
        params: dict[str, Any],
        tags: dict[str, str],
        run_name: str,
        start_time: float | None = None,
    ) -> str | None:
        """Create the run (``start_time`` in epoch seconds, default now); return its id.

        A resumed run keeps its name, start time and parameters; only its tags are renewed.
        """
        from mlflow.entities import Param, RunTag

        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self.set_tags(tags)
            return self.run_id
        run = self.client.create_run(
            str(self.experiment_id),
            start_time=None if start_time is None else int(start_time * 1000),
            run_name=run_name,
            tags=tags,
        )
        self.run_id = run.info.run_id
        self.client.log_batch(
            self.run_id,
            params=[Param(key, str(value)[:6000]) for key, value in sorted(params.items())],
            tags=[RunTag("mlflow.source.name", "secagg")],
        )
        return self.run_id

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self._id(), tags=[RunTag(k, v) for k, v in tags.items()])

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self._id(), metrics=batch)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self._id(), str(path))

    def finish(self, status: str = "FINISHED", end_time: float | None = None) -> None:
        """Close the run (``end_time`` in epoch seconds, default now)."""
        if self.run_id is not None:
            end = None if end_time is None else int(end_time * 1000)
            self.client.set_terminated(self.run_id, status=status, end_time=end)

    def _id(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MlflowTracker.start() was not called")
        return self.run_id


def default_tracking_uri() -> str:
    """MLflow 3's own default: a SQLite store ``mlflow.db`` in the working directory."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def make_tracker(settings: TrackingSettings, run_id: str | None = None) -> Tracker:
    """The tracker a run asked for (``run_id``: the MLflow run a resumed run reopens)."""
    if not settings.enabled:
        return NullTracker()
    return MlflowTracker(settings.uri, settings.experiment, run_id)


def ui_base(tracking_uri: str) -> str:
    """Where the MLflow UI for ``tracking_uri`` is: the tracking server itself, or
    ``mlflow ui`` on its default address for a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def compare_url(tracking_uri: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The MLflow UI page comparing ``run_ids`` side by side (its Compare button's page).

    The UI reads both lists as JSON; they are percent-encoded so terminals keep the link whole.
    """
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = quote(json.dumps([experiment_id]))
    return f"{ui_base(tracking_uri)}/#/compare-runs?runs={runs}&experiments={experiments}"


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves the UI for a local store (None for a tracking server)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {tracking_uri}"
