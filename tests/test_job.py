"""Whole jobs through the library: accuracy with and without HE, and --resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from secagg.config import RunConfig
from secagg.job import run_job


def _config(tmp_path: Path, keys_dir: Path, **changes) -> RunConfig:  # type: ignore[no-untyped-def]
    base = RunConfig(keys_dir=str(keys_dir), tracking=False, output_dir=str(tmp_path / "run"))
    return replace(base, **changes)


@pytest.mark.slow
def test_default_digits_job_reaches_090_and_he_matches_plaintext(tmp_path, session_keys) -> None:
    """The default job (8 clients, 10 rounds) with the same seed, with and without HE."""
    plain = run_job(_config(tmp_path / "p", session_keys, he=False))
    he = run_job(_config(tmp_path / "h", session_keys, he=True))
    assert plain.final >= 0.90
    assert he.final >= 0.90
    # The bar: within 0.3 points every round (one test digit of 360 is 0.28 points).
    for p, h in zip(plain.rounds, he.rounds, strict=True):
        assert abs(p.value("accuracy") - h.value("accuracy")) <= 0.003, f"round {p.round}"
    # HE ciphertexts are bigger than float32, and the server's sum took measurable time.
    assert he.rounds[0].bytes_up_per_client > plain.rounds[0].bytes_up_per_client
    assert all(r.encrypt_seconds > 0 and r.aggregate_seconds > 0 for r in he.rounds)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("he", [False, True])
def test_resume_continues_from_the_last_round(tmp_path, session_keys, he: bool) -> None:
    config = _config(tmp_path, session_keys, he=he, rounds=4, clients=3)

    def stop_after_two(metrics) -> None:  # type: ignore[no-untyped-def]
        if metrics.round == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_job(config, on_round=stop_after_two)
    run_dir = Path(config.output_dir)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["round"] == 2
    chain = sorted(p.name for p in (run_dir / "aggregates").iterdir())
    # Each round keeps its aggregate; HE also the summed scales that decode it, and (masked)
    # the attempt nonce they are checked under. Only encrypted aggregates are named .enc.
    expected = ["round-0001.bin", "round-0002.bin"]
    if he:
        expected = ["round-0001.attempt", "round-0001.enc", "round-0001.scales.enc"]
        expected += ["round-0002.attempt", "round-0002.enc", "round-0002.scales.enc"]
    assert chain == expected
    last = run_dir / "aggregates" / expected[-1].replace(".scales", "")
    checkpoint_before = last.read_bytes()

    seen: list[int] = []
    resumed = run_job(config, resume_dir=run_dir, on_round=lambda m: seen.append(m.round))
    assert seen == [3, 4]
    assert [m.round for m in resumed.rounds] == [1, 2, 3, 4]
    # The chain grew; what was checkpointed before the interruption is untouched.
    assert last.read_bytes() == checkpoint_before
    assert (run_dir / "aggregates" / f"round-0004.{'enc' if he else 'bin'}").exists()

    straight = run_job(replace(config, output_dir=str(tmp_path / "straight")))
    resumed_model = torch.load(run_dir / "model.pt")
    straight_model = torch.load(tmp_path / "straight" / "model.pt")
    for key, value in straight_model.items():
        # Bit-identical, HE too: the packed codec's aggregates decrypt to exact integers, so
        # replaying the chain rebuilds exactly the model every client held.
        assert torch.equal(resumed_model[key], value), key
    assert [m.value("accuracy") for m in resumed.rounds] == [
        m.value("accuracy") for m in straight.rounds
    ]


def test_run_refuses_to_overwrite_an_existing_run(tmp_path, session_keys) -> None:
    from secagg.errors import CheckpointError

    config = _config(tmp_path, session_keys, rounds=1, clients=2)
    run_job(config)
    with pytest.raises(CheckpointError, match="--resume"):
        run_job(config)


def test_plaintext_run_named_enc_by_an_older_version_resumes(tmp_path, session_keys) -> None:
    """Older versions named plaintext aggregates .enc too; their runs still resume."""
    config = _config(tmp_path, session_keys, rounds=3, clients=2)

    def stop_after_one(metrics) -> None:  # type: ignore[no-untyped-def]
        if metrics.round == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_job(config, on_round=stop_after_one)
    run_dir = Path(config.output_dir)
    chain = run_dir / "aggregates"
    (chain / "round-0001.bin").rename(chain / "round-0001.enc")
    resumed = run_job(config, resume_dir=run_dir)
    straight = run_job(replace(config, output_dir=str(tmp_path / "straight")))
    assert [m.value("accuracy") for m in resumed.rounds] == [
        m.value("accuracy") for m in straight.rounds
    ]
    assert sorted(p.name for p in chain.iterdir()) == [
        "round-0001.enc",
        "round-0002.bin",
        "round-0003.bin",
    ]


def test_sampled_rounds_cost_only_their_clients_and_resume_draws_the_same(
    tmp_path, session_keys, monkeypatch
) -> None:
    """50 clients, 4 per round: 5 clients are ever built (4 reusable ones and the evaluator),
    each round's data is loaded for its sampled clients only, and a resumed run draws the same
    clients and ends where an uninterrupted one does."""
    from secagg.builtin import Classification
    from secagg.client import Client
    from secagg.rounds import sample_clients

    built: list[int] = []
    loaded: list[int] = []
    real_init, real_load = Client.__init__, Classification.load_data

    def counting_init(self, task, site, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append(site.index)
        real_init(self, task, site, *args, **kwargs)

    def counting_load(self, site):  # type: ignore[no-untyped-def]
        loaded.append(site.index)
        return real_load(self, site)

    monkeypatch.setattr(Client, "__init__", counting_init)
    monkeypatch.setattr(Classification, "load_data", counting_load)
    config = _config(tmp_path, session_keys, he=True, rounds=3, clients=50, clients_per_round=4)
    config = replace(config, min_client_samples=5)
    straight = run_job(replace(config, output_dir=str(tmp_path / "straight")))
    draws = [sample_clients(50, 4, config.seed, r) for r in (1, 2, 3)]
    assert len(built) == 5 and built[0] == 0  # the evaluator, then the first round's four
    assert sorted(set(loaded)) == sorted({0, *draws[0], *draws[1], *draws[2]})
    assert all(m.clients == 4 for m in straight.rounds)
    assert draws[0] != draws[1]

    def stop_after_one(metrics) -> None:  # type: ignore[no-untyped-def]
        if metrics.round == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_job(config, on_round=stop_after_one)
    resumed = run_job(config, resume_dir=config.output_dir)
    assert [m.value("accuracy") for m in resumed.rounds] == [
        m.value("accuracy") for m in straight.rounds
    ]
    for key, value in torch.load(tmp_path / "straight" / "model.pt").items():
        assert torch.equal(torch.load(Path(config.output_dir) / "model.pt")[key], value), key


def test_he_refuses_more_clients_per_round_than_its_headroom(tmp_path, session_keys) -> None:
    from secagg.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        _config(tmp_path, session_keys, he=True, clients=5000, clients_per_round=2000).validate()
    assert str(refused.value) == (
        "HE aggregation sums at most 1024 clients per round, this job has 2000 per round; set "
        "clients_per_round (--clients-per-round) to 1024 or fewer"
    )
    _config(tmp_path, session_keys, he=True, clients=5000, clients_per_round=1000).validate()


@pytest.mark.slow
def test_rounds_above_128_clients_use_the_wide_packing_and_match_plaintext(
    tmp_path, session_keys
) -> None:
    """140 clients per round (of 160): the round's packing is the wide one (two 21-bit
    values per slot), sums still decrypt exactly, and HE follows plaintext FedAvg. (Without
    masks, which change no sum, and whose cost at this size a simulation pays for every
    client at once: masked rounds are tested in test_masking and test_neighbours, and their
    cost at 100 and 1,000 clients measured by bench/graph.py.)"""
    config = _config(tmp_path, session_keys, rounds=1, clients=160, clients_per_round=140)
    config = replace(config, min_client_samples=1, masking=False)
    plain = run_job(replace(config, he=False, output_dir=str(tmp_path / "plain")))
    he = run_job(replace(config, he=True, output_dir=str(tmp_path / "he")))
    for p, h in zip(plain.rounds, he.rounds, strict=True):
        assert h.clients == 140
        assert abs(p.value("accuracy") - h.value("accuracy")) <= 0.003, f"round {p.round}"
    # Two values per slot instead of three: half as many again bytes per value.
    ratio = he.rounds[0].bytes_up_per_client / plain.rounds[0].bytes_up_per_client
    assert ratio > 2


def test_deployment_latency_checks_uploads_side_by_side_and_adds_them_in_turn() -> None:
    """The latency model of a round's sum: each upload is checked on the thread that
    received it as it arrives (side by side), and added one at a time."""
    from secagg.rounds import _streamed
    from secagg.server import Summed

    together = Summed(b"", seconds=[0.1, 0.1, 0.1], checks=[1.0, 1.0, 1.0])
    assert _streamed(together, [0.0, 0.0, 0.0]) == pytest.approx(1.3)
    assert _streamed(together, [0.0, 2.0, 4.0]) == pytest.approx(5.1)
    unchecked = Summed(b"", seconds=[0.5, 0.5])
    assert _streamed(unchecked, [0.0, 0.0]) == pytest.approx(1.0)
