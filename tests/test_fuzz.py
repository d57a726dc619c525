"""Hostile payloads never crash a receiver and never turn into silent garbage.

The cases run in a child process (``fuzz_payloads.py``), which reports every case as it is
done: a crash of TenSEAL or of anything else would kill that process, and the test would say
which case did it.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CASES = 1100


@pytest.mark.slow
def test_a_thousand_hostile_payloads_are_refused_by_name(session_keys: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run(
        [sys.executable, str(HERE / "fuzz_payloads.py"), str(session_keys), "--cases", str(CASES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    results = [line for line in lines if "case" in line]
    last = results[-1]["case"] if results else None
    assert done.returncode == 0, f"fuzz process died after case {last}: {done.stderr[-2000:]}"
    assert lines[-1] == {"done": CASES}
    assert len(results) == CASES

    outcomes = collections.Counter(r["outcome"] for r in results)
    assert outcomes["error"] == 0, [r for r in results if r["outcome"] == "error"][:5]
    assert outcomes["garbage"] == 0, [r for r in results if r["outcome"] == "garbage"][:5]
    # Accepted cases gave exactly the honest result: flips of low bits that rounding absorbs.
    assert set(outcomes) <= {"rejected", "harmless"}
    rejected = [r for r in results if r["outcome"] == "rejected"]
    assert all(r["reason"] and r["reason"] != "invalid" for r in rejected)
    assert len(rejected) >= 0.9 * CASES
    # Every hostile kind that must be refused was refused, by the reason that names it.
    by_kind = collections.defaultdict(set)
    for r in results:
        by_kind[r["kind"]].add(r["reason"] if r["outcome"] == "rejected" else r["outcome"])
    assert by_kind["duplicate"] == {"duplicate"}
    assert by_kind["duplicate-restamped"] <= {"duplicate"}
    assert by_kind["replayed"] == {"wrong-round"}
    assert by_kind["replayed-restamped"] == {"replayed"}
    assert by_kind["dropped"] == {"dropped"}
    assert by_kind["unlisted"] == {"tampered"}
    # A keyless ciphertext added to the aggregate: the tally, weight or clipped count may
    # name it first; whatever the ledger misses, the integrity tag refuses.
    assert "forged" in by_kind["keyless"]
    assert by_kind["keyless"] <= {
        "forged",
        "tampered",
        "dropped",
        "duplicate",
        "replayed",
        "bad-weight",
        "out-of-range",
    }
    # A seed that is not the ciphertexts' own: c1 is wrong, the sum decrypts to noise.
    for kind in ("seed-forged", "seed-swapped", "seed-dropped"):
        assert by_kind[kind] == {"not-integer"}, (kind, by_kind[kind])
    # One seed more than the roster has members is refused before decrypting.
    assert by_kind["seed-added"] <= {"not-integer", "malformed"}
    assert by_kind["update-as-aggregate"] == {"wrong-kind"}
    assert by_kind["aggregate-as-update"] == {"wrong-kind"}
    assert "harmless" not in by_kind["truncated"] | by_kind["random"] | by_kind["bit-flip"]
    assert "harmless" not in by_kind["foreign-key"] | by_kind["resized"]
