"""Smoke test of the codec benchmark: a tiny run produces a complete report. No timing checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import codec  # noqa: E402

SIZE = 12_282
CONFIGS = {"plain", "secagg-float", "secagg-packed", "peer-baseline"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    # 12,282 values fill one packed ciphertext exactly (4,094 slots of three, plus two tail
    # slots), so bytes per parameter show the codec's density, not padding.
    argv = ["--quick", "--sizes", str(SIZE), "--clients", "2,3", "--scale-size", "5000"]
    return codec.main([*argv, "--out", str(out)])


def test_every_config_reports_throughput_and_size(results: dict) -> None:
    rows = results["throughput"]
    assert {row["config"] for row in rows} == CONFIGS
    for row in rows:
        assert row["size"] == SIZE
        for step in ("encrypt", "sum", "decrypt"):
            assert row[f"{step}_params_per_s"] > 0, (row["config"], step)
        assert row["bytes_per_param"] > 0
        assert row["enc_dec_cpu_s_per_million"] >= 0
        assert row["max_abs_error"] < 1e-3, row["config"]  # every config decrypts the sum


def test_plain_is_four_bytes_per_parameter(results: dict) -> None:
    (plain,) = [row for row in results["throughput"] if row["config"] == "plain"]
    assert plain["bytes_per_param"] == pytest.approx(4.0, abs=0.05)


def test_packed_codec_is_at_most_twelve_bytes_per_parameter(results: dict) -> None:
    """Issue 4's wire target: three values per slot, about a third of the float codec."""
    by_config = {row["config"]: row for row in results["throughput"]}
    packed, floats = by_config["secagg-packed"], by_config["secagg-float"]
    assert packed["bytes_per_param"] <= 12
    assert packed["result_bytes_per_param"] <= 12
    assert packed["bytes_per_param"] < floats["bytes_per_param"] / 2.5


def test_speedup_and_scaling_sections(results: dict) -> None:
    speedups = {(s["config"], s["size"]) for s in results["speedup"]}
    assert speedups == {("secagg-float", SIZE), ("secagg-packed", SIZE)}
    scaling = results["scaling"]
    assert [row["clients"] for row in scaling["rows"]] == [2, 3]
    assert all(row["sum_s"] > 0 and row["peak_rss_bytes"] >= 0 for row in scaling["rows"])
    assert results["machine"]["cpu_count"] >= 1
    assert results["machine"]["tenseal"]


def test_writes_markdown_and_json(results: dict) -> None:
    md = Path(results["files"]["markdown"])
    data = Path(results["files"]["json"])
    assert md.exists() and md.suffix == ".md" and md.name.startswith("codec-")
    assert data.exists() and data.suffix == ".json"
    text = md.read_text()
    for config in CONFIGS:
        assert config in text
    saved = json.loads(data.read_text())
    assert len(saved["throughput"]) == len(results["throughput"])
