"""What a user sees of a run in MLflow, with a real MLflow SQLite store: the run's name, its
description and tags, one duration, and the UI links the CLI prints."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote

import pytest

from secagg.config import RunConfig
from secagg.job import run_job
from secagg.records import RunResult
from secagg.tracking import DESCRIPTION_TAG, compare_url, run_url, ui_command


def _tracked_run(tmp_path: Path, keys: Path, **changes) -> tuple[RunResult, str]:  # type: ignore[no-untyped-def]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = RunConfig(
        clients=2,
        rounds=2,
        keys_dir=str(keys),
        tracking_uri=uri,
        output_dir=str(tmp_path / "run"),
        **changes,
    )
    return run_job(config), uri


@pytest.mark.parametrize("he", [False, True])
def test_run_name_description_and_tags_say_what_ran(tmp_path, session_keys, he: bool) -> None:
    from mlflow.tracking import MlflowClient

    result, uri = _tracked_run(tmp_path, session_keys, he=he)
    run = MlflowClient(tracking_uri=uri).get_run(str(result.mlflow_run_id))
    mode = "he" if he else "plain"
    # What differs between runs comes first: the runs table cuts names at ~25 characters.
    assert run.info.run_name == result.run_name
    assert run.info.run_name.startswith(f"{mode}-digits-2c-")
    tags = run.data.tags
    assert {k: tags[k] for k in ("he", "mode", "job", "dataset", "model", "clients")} == {
        "he": str(he).lower(),
        "mode": mode,
        "job": "digits",
        "dataset": "digits",
        "model": "mlp",
        "clients": "2",
    }
    text = tags[DESCRIPTION_TAG]
    assert ("HE secure aggregation" if he else "Plaintext FedAvg") in text
    assert "job `digits`" in text
    assert "model: mlp (9,610 parameters)" in text
    assert "dataset: digits" in text
    assert "clients: 2, rounds: 2" in text
    assert ("CKKS, packed" if he else "plaintext float32") in text
    up, down = result.bytes_per_parameter or (0.0, 0.0)
    assert f"bytes per parameter, per client and round: {up:.2f} up, {down:.2f} down" in text
    assert (up > 10) if he else (up == pytest.approx(4.0, rel=0.01))


def test_one_duration_in_results_mlflow_metric_and_mlflow_run(tmp_path, session_keys) -> None:
    from mlflow.tracking import MlflowClient

    result, uri = _tracked_run(tmp_path, session_keys)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    run = MlflowClient(tracking_uri=uri).get_run(str(result.mlflow_run_id))
    assert saved["seconds"] == result.seconds > 0
    assert run.data.metrics["run_seconds"] == pytest.approx(result.seconds)
    # MLflow's own Duration column: created and closed with the same clock, to the millisecond.
    duration = (run.info.end_time - run.info.start_time) / 1000
    assert duration == pytest.approx(result.seconds, abs=0.002)
    # and the run is longer than its rounds: it includes building the clients
    assert result.seconds >= sum(m.round_seconds for m in result.rounds)
    assert RunResult.from_dict(saved, tmp_path / "run").mlflow_experiment_id == (
        run.info.experiment_id
    )


def test_resumed_run_adds_the_earlier_sessions_seconds(tmp_path, session_keys) -> None:
    class Stop(Exception):
        pass

    def stop(metrics) -> None:  # type: ignore[no-untyped-def]
        raise Stop

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = RunConfig(clients=2, rounds=2, tracking_uri=uri, output_dir=str(tmp_path / "run"))
    with pytest.raises(Stop):
        run_job(config, on_round=stop)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["seconds"] > 0
    resumed = run_job(config, resume_dir=tmp_path / "run")
    assert resumed.seconds > state["seconds"]
    # still one MLflow run, under its first name, holding the whole run's seconds
    run = MlflowClient(tracking_uri=uri).get_run(str(resumed.mlflow_run_id))
    assert resumed.mlflow_run_id == state["mlflow_run_id"]
    assert run.info.run_name == resumed.run_name == state["run_name"]
    assert run.data.metrics["run_seconds"] == pytest.approx(resumed.seconds)


def test_ui_urls_have_mlflows_shape() -> None:
    local = "sqlite:////tmp/x/mlflow.db"
    assert run_url(local, "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert ui_command(local) == f"mlflow ui --backend-store-uri {local}"
    server = "http://mlflow.example.org:5000/"
    assert run_url(server, "3", "abc") == "http://mlflow.example.org:5000/#/experiments/3/runs/abc"
    assert ui_command(server) is None
    url = compare_url(local, "3", ["abc", "def"])
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?runs=")
    # the UI parses both lists as JSON
    assert unquote(url).endswith('?runs=["abc","def"]&experiments=["3"]')
