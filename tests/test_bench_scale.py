"""Smoke test of bench/scale.py: a quick in-process run at two populations, and its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scale
from bench.synthetic_task import SyntheticDigits
from secagg.task import Site


@pytest.mark.slow
def test_scale_reports_round_time_memory_and_bytes(tmp_path: Path, session_keys: Path) -> None:
    report = scale.main(
        [
            "--quick",
            "--tasks",
            "synthetic",
            "--transports",
            "inprocess",
            "--clients",
            "200,400",
            "--per-round",
            "10",
            "--keys",
            str(session_keys),
            "--out",
            str(tmp_path),
        ]
    )
    cases = report["cases"]
    assert [(c["clients"], c["per_round"]) for c in cases] == [(200, 10), (400, 10)]
    for case in cases:
        assert "failed" not in case, case.get("failed")
        assert len(case["rounds_measured"]) == 2
        seconds = case["round_seconds"]
        assert 0 < seconds["min"] <= seconds["median"] <= seconds["max"]
        assert case["bytes_per_round"]["median"] > 0
        # memory is reported for every round, and its peak for the case
        assert [m["round"] for m in case["memory_per_round"]] == [1, 2]
        assert all(m["driver_rss_mb"] > 0 for m in case["memory_per_round"])
        assert case["memory"]["driver_peak_mb"] >= case["memory_per_round"][0]["driver_rss_mb"]
        assert case["startup_seconds"] > 0
    # the same clients per round: the same bytes, whatever the population
    assert cases[0]["bytes_per_round"] == cases[1]["bytes_per_round"]
    (flat,) = report["flatness"]
    assert flat["clients"] == [200, 400] and "driver_peak_mb" in flat["figures"]
    saved = json.loads(Path(report["files"]["json"]).read_text())
    assert saved["cases"][0]["round_seconds"] == cases[0]["round_seconds"]
    markdown = Path(report["files"]["md"]).read_text()
    assert "| synthetic | 400 | 10 | inprocess |" in markdown


def test_synthetic_examples_are_seeded_and_made_on_demand() -> None:
    task = SyntheticDigits(examples_per_client=5)
    site = Site(7, "site-8", 10_000, Path("data"), seed=3)
    one, two = task.load_data(site), task.load_data(site)
    assert len(one.train) == 5 and one.test is None
    x, y = one.train[4]
    x2, y2 = two.train[4]
    assert y == y2 and bool((x == x2).all()) and tuple(x.shape) == (1, 8, 8)
    other = task.load_data(Site(8, "site-9", 10_000, Path("data"), seed=3))
    assert not bool((other.train[0][0] == x).all())
    assert task.load_data(Site(0, "site-1", 10, Path("data"))).test is not None
    with pytest.raises(IndexError):
        one.train[5]
