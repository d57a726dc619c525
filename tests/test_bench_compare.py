"""Smoke test of bench/compare_he.py on a tiny job: the report's fields, files and MLflow runs."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import compare_he


@pytest.mark.slow
def test_compare_he_reports_both_runs_side_by_side(
    tmp_path: Path, session_keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
            "--repeats",
            "2",
        ]
    )
    # Warmed up, then two timed pairs, the second with HE first; medians of both repeats.
    assert report["repeats"] == 2
    assert report["first_in_each_repeat"] == ["plain", "he"]
    runs_dir = tmp_path / "results" / "runs"
    assert len(list(runs_dir.glob("*-warmup-plain"))) == len(list(runs_dir.glob("*-warmup-he")))
    for key in ("run_seconds", "simulated_wall_seconds"):
        assert len(report["he"]["samples"][key]) == 2
        ratio = report["time_ratios"][key]
        assert ratio["low"] <= ratio["high"]
    assert report["plain"]["metric_same_in_every_repeat"]
    markdown = Path(report["files"]["md"]).read_text()
    assert "alternating which went first (plaintext, HE)" in markdown
    assert "a payload is whole ciphertexts" in markdown
    # Latency round by round too: one slow round moves the sum, not the median of the ratios.
    each = report["latency_round_ratios"]
    assert len(each) == 2 and all(ratio > 0 for ratio in each)
    median_round = report["ratios"]["deployment_latency_median_round"]
    assert median_round == pytest.approx(statistics.median(each))
    assert f"{median_round:.2f}x |" in markdown and "median of the rounds' own ratios" in markdown
    assert report["bytes_per_parameter"]["values_per_ciphertext"] == 8192 * 3  # N coefficients
    for side in ("plain", "he"):
        figures = report[side]
        assert 0 <= figures["final_metric"] <= 1
        assert figures["simulated_wall_seconds"] > 0
        assert figures["deployment_latency_seconds"] > 0
        assert set(figures["seconds_per_round"]) == set(compare_he.STEPS)
        assert figures["upload_bytes_per_parameter"] > 0
    assert report["plain"]["upload_bytes_per_parameter"] == pytest.approx(4.0, rel=0.05)
    assert report["he"]["seconds_per_round"]["encrypt"] > 0
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:  # the floor: plaintext against itself, float64 updates
        assert 0 <= row["float64_metric"] <= 1
        assert row["floor_points"] == pytest.approx(
            100 * (row["float64_metric"] - row["plain_metric"])
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
    experiment = he_run_experiment(client, report)
    runs = client.search_runs([experiment])
    # the parent, plaintext, HE and the float64 plaintext run; timing repeats are not tracked
    assert len(runs) == 4
    he_run = client.get_run(report["he"]["mlflow_run_id"])
    plain_run = client.get_run(report["plain"]["mlflow_run_id"])
    assert he_run.info.run_name.startswith("he-digits-3c-")
    assert plain_run.info.run_name.startswith("plain-digits-3c-")
    parent = he_run.data.tags["mlflow.parentRunId"]
    assert plain_run.data.tags["mlflow.parentRunId"] == parent
    parent_run = client.get_run(parent)
    assert parent_run.info.run_name.startswith("he-vs-plain-digits-3c-")
    assert "ratio_simulated_wall_time" in parent_run.data.metrics
    assert [m.step for m in client.get_metric_history(parent, "he_accuracy")] == [1, 2]
    artifacts = [a.path for a in client.list_artifacts(parent)]
    assert any(path.endswith("-accuracy.png") for path in artifacts)  # accuracy per round

    # The last lines printed: the MLflow page comparing the two runs, and how to serve the UI.
    pair = f'["{plain_run.info.run_id}","{he_run.info.run_id}"]'
    compare = report["mlflow"]["compare_url"]
    assert unquote(compare) == (
        f'http://127.0.0.1:5000/#/compare-runs?runs={pair}&experiments=["{experiment}"]'
    )
    assert compare in parent_run.data.tags["mlflow.note.content"]
    out = capsys.readouterr().out.splitlines()
    assert out[-3] == f"MLflow, HE vs plaintext side by side: {compare}"
    assert out[-1] == f"start the UI first: mlflow ui --backend-store-uri {uri}"


def test_compare_he_reports_the_metric_against_epsilon(tmp_path: Path, session_keys: Path) -> None:
    """The DP axis: HE again per epsilon, each within its epsilon, less noise for a larger
    one, no byte more than HE without DP, a table and a plot."""
    report = compare_he.main(
        [
            *("--quick", "--rounds", "1", "--clients", "3", "--repeats", "1", "--no-floor"),
            *("--no-memory", "--no-tracking", "--keys", str(session_keys), "--out", str(tmp_path)),
            *("--dp-epsilons", "2,20", "--dp-clip", "0.5"),
        ]
    )
    rows = report["dp"]
    assert [r["epsilon_target"] for r in rows] == [2.0, 20.0, None]
    assert all(r["epsilon"] <= r["epsilon_target"] * (1 + 1e-9) for r in rows[:2])
    assert rows[0]["noise_multiplier"] > rows[1]["noise_multiplier"] > 0
    assert (
        all(0 <= r["central_metric"] <= 1 for r in rows[:2]) and rows[2]["central_metric"] is None
    )
    assert all(r["bytes_up_per_round"] == rows[-1]["bytes_up_per_round"] for r in rows)
    assert Path(report["files"]["dp_png"]).stat().st_size > 10_000
    assert (
        "## Differential privacy: the metric against epsilon"
        in Path(report["files"]["md"]).read_text()
    )


def test_a_ratio_below_one_is_reported_as_noise() -> None:
    faster = compare_he._ratio([10.0, 10.4], [9.8, 10.5])
    assert faster["median"] < 1.0 and faster["within_noise"]
    assert compare_he._ratio_text(faster, 2).endswith("within noise: no measurable HE overhead")
    single = compare_he._ratio([10.0], [9.9])
    assert "within noise, one repeat: noise not measured" in compare_he._ratio_text(single, 1)
    overlapping = compare_he._ratio([10.0, 10.0], [10.5, 9.9])
    assert compare_he._ratio_text(overlapping, 2).endswith("within noise")
    slower = compare_he._ratio([10.0, 10.2], [12.0, 12.1])
    assert compare_he._ratio_text(slower, 2) == "1.19x (repeats 1.19-1.20x)"


def he_run_experiment(client, report) -> str:  # type: ignore[no-untyped-def]
    return client.get_run(report["he"]["mlflow_run_id"]).info.experiment_id


@pytest.mark.slow
def test_optimizers_bench_writes_its_table_and_figure(tmp_path: Path) -> None:
    from bench import optimizers

    report = optimizers.main(
        [
            "--rounds",
            "2",
            "--clients",
            "2",
            "--alphas",
            "0.5",
            "--optimizers",
            "fedavg",
            "fedadam",
            "--plain-only",
            "--out",
            str(tmp_path),
        ]
    )
    assert [(r["optimizer"], r["he"], len(r["accuracy"])) for r in report["rows"]] == [
        ("fedavg", False, 2),
        ("fedadam", False, 2),
    ]
    markdown = Path(report["files"]["md"]).read_text()
    assert "| 0.5 | fedadam | plaintext |" in markdown
    assert "fedadam (server lr 0.1, beta1 0.9, beta2 0.99, tau 0.001)" in markdown
    assert Path(report["files"]["png"]).stat().st_size > 0


def test_the_seed_summary_sets_each_seed_and_their_mean_against_the_floor() -> None:
    """bench/seeds.py: a seed beyond its own floor shows as such, and the mean over the seeds
    of HE − plaintext (HE's effect) and of |HE − plaintext| are set against the mean |floor|."""
    from bench import seeds

    def report(difference: float, floor: float, plain: float) -> dict[str, object]:
        last = {
            "plain_metric": plain,
            "he_metric": plain + difference / 100,
            "float64_metric": plain + floor / 100,
            "difference_points": difference,
            "floor_points": floor,
        }
        return {
            "job": {"model": "m", "dataset": "d", "clients": 8, "rounds": 1},
            "rounds": [last],
            "ratios": {"simulated_wall_time": 1.02, "deployment_latency": 1.01},
        }

    summary = seeds.summarize(
        {0: report(0.56, -0.28, 0.90), 1: report(0.0, 0.28, 0.93), 2: report(-0.28, 0.56, 0.95)}
    )
    assert [f["within_floor"] for f in summary["final"].values()] == [False, True, True]
    assert not summary["final_within_floor_every_seed"]
    assert summary["final_mean_abs_difference_points"] == pytest.approx(0.84 / 3)
    assert summary["final_mean_abs_floor_points"] == pytest.approx(1.12 / 3)
    # HE's mean effect, signed: +0.28 / 3 points, within the mean |floor|
    assert summary["final_mean_difference_points"] == pytest.approx(0.28 / 3)
    assert summary["final_mean_within_floor"]
    markdown = seeds.to_markdown(summary)
    assert "mean HE − plaintext over the seeds: +0.09 points, within the mean |floor| of 0.37" in (
        markdown
    )
    # A codec that moves every seed the same way is beyond, though each seed is near its floor
    biased = seeds.summarize({s: report(0.56, 0.28 * (-1) ** s, 0.9) for s in range(3)})
    assert biased["final_mean_difference_points"] == pytest.approx(0.56)
    assert not biased["final_mean_within_floor"]
    assert "mean |HE − plaintext| 0.28 points, mean |floor| 0.37 points (within the floor)" in (
        markdown
    )


def _seed_report(seed: int, difference: float, floor: float | None) -> dict[str, object]:
    last = {
        "plain_metric": 0.9,
        "he_metric": 0.9 + difference / 100,
        "float64_metric": None if floor is None else 0.9 + floor / 100,
        "difference_points": difference,
        "floor_points": floor,
    }
    job = {"model": "m", "dataset": "d", "clients": 8, "rounds": 1, "seed": seed}
    ratios = {"simulated_wall_time": 1.0, "deployment_latency": 1.0}
    return {"job": job, "rounds": [last], "ratios": ratios}


def test_the_seed_summary_counts_seeds_farther_and_nearer_than_the_floor() -> None:
    """Ties (the same number of test images) are counted apart, and the sign test weighs only
    the untied seeds: 2 farther, 0 nearer is a coin flip's outcome (p = 0.5), 9 to 1 is not."""
    from bench import seeds

    finals = {
        0: {"difference_points": 0.56, "floor_points": -0.28},
        1: {"difference_points": -0.28, "floor_points": 0.28},
        2: {"difference_points": 0.83, "floor_points": 0.0},
    }
    counts = seeds._farther_or_nearer(finals)
    assert (counts["final_farther_seeds"], counts["final_nearer_seeds"]) == (2, 0)
    assert counts["final_tied_seeds"] == 1
    assert counts["final_sign_test_p"] == pytest.approx(0.5)
    assert seeds.sign_test(9, 1) == pytest.approx(2 * 11 / 1024)
    assert seeds.sign_test(0, 0) == 1.0


def test_the_seed_summary_reads_reports_of_one_job_only(tmp_path: Path) -> None:
    """--reports summarizes compare_he reports without running anything, and refuses, in one
    line, a report of another job, a seed given twice or a report without its floor."""
    from bench import seeds

    def write(name: str, report: dict[str, object]) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(report))
        return path

    a = write("a.json", _seed_report(0, 0.28, -0.28))
    b = write("b.json", _seed_report(1, -0.28, 0.56))
    summary = seeds.main(["--reports", str(b), str(a), "--out", str(tmp_path / "out")])
    assert summary["seeds"] == [0, 1]
    assert summary["final_tied_seeds"] == 1 and summary["final_nearer_seeds"] == 1
    assert list((tmp_path / "out").glob("*-seeds.md"))

    other = _seed_report(2, 0.0, 0.0)
    other["job"]["model"] = "cnn"  # type: ignore[index]
    bad = [
        (write("other.json", other), "another job than the first report (model)"),
        (a, "seed 0 is given twice"),
        (write("nofloor.json", _seed_report(3, 0.0, None)), "no float64 floor"),
        (write("junk.json", {"rounds": []}), "not a compare_he JSON report"),
    ]
    for path, reason in bad:
        with pytest.raises(SystemExit, match=re.escape(reason)):
            seeds.load_reports([a, path])


def test_an_epsilon_the_job_cannot_reach_is_a_row_that_says_why(
    tmp_path: Path, session_keys: Path
) -> None:
    """compare_he's DP axis: an epsilon whose noise leaves the codec no room for the round's
    updates is refused by the job with one line, which the axis reports in its row, and the
    axis goes on with the next epsilon."""
    from dataclasses import replace

    from bench import dp_axis
    from secagg.config import RunConfig
    from secagg.job import run_job

    config = RunConfig(
        he=True, clients=3, rounds=1, tracking=False, device="cpu", keys_dir=str(session_keys)
    )
    he = run_job(replace(config, output_dir=str(tmp_path / "he")))
    results = dp_axis.run(config, [0.01, 8.0], 0.5, tmp_path, "t", lambda line: None)
    assert isinstance(results[0], dp_axis.Refused) and isinstance(results[1], dp_axis.Refused)
    assert "leaves the codec no room" in results[0].reason
    assert len(results) == 4  # epsilon 8: HE with distributed DP, plaintext with central DP
    rows = dp_axis.summarize(results, he)
    assert rows[0]["refused"] == results[0].reason and rows[1]["final_metric"] > 0
    table = dp_axis.to_markdown(rows, "accuracy")
    assert "| 0.01 | refused: a noise multiplier" in table


def test_dp_noise_measures_the_sums_noise_against_central_dps(
    tmp_path: Path, session_keys: Path
) -> None:
    """bench/dp_noise.py on a real codec round: the decrypted noise is at least the floor any
    threshold of sites owes, near it at epsilon 8, and the report says so."""
    from bench import dp_noise

    report = dp_noise.main(
        ["--sites", "8", "--epsilons", "8", "--keys", str(session_keys), "--out", str(tmp_path)]
    )
    (row,) = report["rows"]  # type: ignore[index]
    assert row["floor"] * 0.97 < row["measured"] < row["floor"] * 1.1
    assert row["steps_from_clip"] >= row["floor"]
    assert "| 8 | 8 | 2.02 | 6 |" in next(tmp_path.glob("dp-noise-*.md")).read_text()
