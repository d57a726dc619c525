"""Smoke test of bench/compare_he.py on a tiny job: the report's fields, files and MLflow runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import compare_he


@pytest.mark.slow
def test_compare_he_reports_both_runs_side_by_side(tmp_path: Path, session_keys: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'bench.db'}"
    report = compare_he.main(
        [
            "--quick",
            "--rounds",
            "2",
            "--clients",
            "3",
            "--keys",
            str(session_keys),
            "--out",
            str(tmp_path / "results"),
            "--tracking-uri",
            uri,
        ]
    )
    for side in ("plain", "he"):
        figures = report[side]
        assert 0 <= figures["final_accuracy"] <= 1
        assert figures["simulated_wall_seconds"] > 0
        assert figures["deployment_latency_seconds"] > 0
        assert set(figures["seconds_per_round"]) == set(compare_he.STEPS)
        assert figures["upload_bytes_per_parameter"] > 0
    assert report["plain"]["upload_bytes_per_parameter"] == pytest.approx(4.0, rel=0.05)
    assert report["he"]["seconds_per_round"]["encrypt"] > 0
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:  # the floor: plaintext against itself, float64 updates
        assert 0 <= row["float64_accuracy"] <= 1
        assert row["floor_points"] == pytest.approx(
            100 * (row["float64_accuracy"] - row["plain_accuracy"])
        )
    assert report["ratios"]["upload_bytes"] > 1
    for process in ("plain_client", "plain_server", "he_client", "he_server"):
        assert report["memory_mb"][process]["peak_mb"] > 0

    files = {key: Path(value) for key, value in report["files"].items()}
    assert files["png"].stat().st_size > 10_000
    assert "| final accuracy |" in files["md"].read_text()
    assert json.loads(files["json"].read_text())["num_parameters"] == report["num_parameters"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([he_run_experiment(client, report)])
    assert len(runs) == 4  # the parent, plaintext, HE and the float64 plaintext run
    he_run = client.get_run(report["he"]["mlflow_run_id"])
    plain_run = client.get_run(report["plain"]["mlflow_run_id"])
    parent = he_run.data.tags["mlflow.parentRunId"]
    assert plain_run.data.tags["mlflow.parentRunId"] == parent
    assert "ratio_simulated_wall_time" in client.get_run(parent).data.metrics


def he_run_experiment(client, report) -> str:  # type: ignore[no-untyped-def]
    return client.get_run(report["he"]["mlflow_run_id"]).info.experiment_id
