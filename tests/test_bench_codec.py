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

SIZE = 12_145
CONFIGS = {"plain", "secagg-packed", "peer-baseline"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    # 12,145 values fill one packed ciphertext exactly (4,048 slots of three values, then 43
    # slots of the 128-client tally, 3 ledger slots and 2 of the integrity tag), so bytes per
    # parameter show the codec's density, not padding.
    argv = ["--quick", "--sizes", str(SIZE), "--clients", "2,3", "--scale-size", "5000"]
    argv += ["--server-size", "50000", "--server-clients", "3", "--wire-models", "mlp"]
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
    # float32, plus the ledger: a 128-client tally and three whole values (1% at this size)
    assert plain["bytes_per_param"] == pytest.approx(4.0, rel=0.02)


def test_packed_codec_is_at_most_twelve_bytes_per_parameter(results: dict) -> None:
    """Issue 4's wire target: three values per slot, a small fraction of the peer's bytes."""
    by_config = {row["config"]: row for row in results["throughput"]}
    packed, peer = by_config["secagg-packed"], by_config["peer-baseline"]
    assert packed["bytes_per_param"] <= 12
    assert packed["result_bytes_per_param"] <= 12
    assert packed["bytes_per_param"] < peer["bytes_per_param"] / 5


def test_wire_section_measures_a_whole_round_against_the_earlier_format(results: dict) -> None:
    """The digits MLP at both precisions: one ciphertext per phase each way; seeded c1 halves
    every ciphertext; the fine packing decodes closer to the exact sum."""
    standard, fine = results["wire"]
    assert (standard["precision"], fine["precision"]) == ("standard", "fine")
    for row in (standard, fine):
        assert row["model"] == "mlp (digits)" and row["values"] == 9_610 and row["clients"] == 8
        assert row["max_abs_error"] < 1e-3
        for way in ("up", "down"):
            seeded, before = row[f"{way}_seeded_per_value"], row[f"{way}_unseeded_per_value"]
            assert 0.49 < seeded / before < 0.51
            assert row[f"{way}_seeded_scales_per_value"] > 0
    assert fine["max_abs_error"] < standard["max_abs_error"] / 16
    assert "Bytes per value on the wire" in results["markdown"]


def test_speedup_and_scaling_sections(results: dict) -> None:
    speedups = {(s["config"], s["size"]) for s in results["speedup"]}
    assert speedups == {("secagg-packed", SIZE)}
    scaling = results["scaling"]
    assert [row["clients"] for row in scaling["rows"]] == [2, 3]
    assert all(row["sum_s"] > 0 and row["peak_rss_bytes"] >= 0 for row in scaling["rows"])
    assert results["machine"]["cpu_count"] >= 1
    assert results["machine"]["tenseal"]


def test_server_memory_is_measured_in_its_own_process(results: dict) -> None:
    memory = results["server_memory"]
    assert memory["clients"] == 3 and memory["size"] == 50_000
    assert memory["idle_rss_bytes"] > 0
    assert memory["peak_rss_bytes"] >= memory["idle_rss_bytes"]
    assert memory["growth_in_payloads"] == memory["growth_bytes"] / memory["payload_bytes"]
    assert "payloads above idle" in results["markdown"]


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
