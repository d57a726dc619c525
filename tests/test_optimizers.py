"""Federated optimizers: server-optimizer steps against the paper's equations, client lr
schedules, FedProx, and whole jobs (HE against plaintext, --resume) with FedAdam."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from secagg.config import SERVER_OPTIMIZERS, RunConfig
from secagg.errors import ConfigError, PayloadError
from secagg.flatten import flatten
from secagg.job import build_clients, run_job
from secagg.optimizers import Hyper, ServerOptimizer, client_lr
from secagg.task import RoundContext

# --- the server optimizers against a direct implementation of Reddi et al., Algorithm 2 -----

BETA1, BETA2, TAU, LR, MOMENTUM = 0.9, 0.99, 1e-3, 0.05, 0.8


def _deltas() -> list[np.ndarray]:
    """A fixed sequence of average changes: signs flip, some coordinates stay 0, magnitudes
    span several decades (so Yogi's sign(v - Δ²) takes both values)."""
    rng = np.random.default_rng(16)
    scales = np.array([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 0.0])
    return [rng.standard_normal(6) * scales * (1 + t) for t in range(8)]


def _reference(name: str, deltas: list[np.ndarray], x0: np.ndarray) -> list[np.ndarray]:
    """The models x_1 .. x_T, one coordinate at a time in plain Python floats."""
    xs = []
    x = [float(value) for value in x0]
    n = len(x)
    m = [0.0] * n  # m_{-1} = 0
    v = [TAU**2] * n  # v_{-1} >= tau^2 (at equality)
    buf = [0.0] * n  # FedAvgM's momentum buffer
    for delta in deltas:
        for i in range(n):
            d = float(delta[i])
            if name == "fedavg":
                x[i] = x[i] + LR * d
                continue
            if name == "fedavgm":
                buf[i] = MOMENTUM * buf[i] + d
                x[i] = x[i] + LR * buf[i]
                continue
            m[i] = BETA1 * m[i] + (1 - BETA1) * d
            if name == "fedadagrad":
                v[i] = v[i] + d**2
            elif name == "fedyogi":
                diff = v[i] - d**2
                sign = 0.0 if diff == 0 else math.copysign(1.0, diff)
                v[i] = v[i] - (1 - BETA2) * d**2 * sign
            else:
                v[i] = BETA2 * v[i] + (1 - BETA2) * d**2
            x[i] = x[i] + LR * m[i] / (math.sqrt(v[i]) + TAU)
        xs.append(np.array(x))
    return xs


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_each_server_optimizer_follows_the_papers_equations(name: str) -> None:
    hyper = Hyper(name, LR, MOMENTUM, BETA1, BETA2, TAU)
    deltas = _deltas()
    x0 = np.linspace(-1, 1, 6)
    expected = _reference(name, deltas, x0)
    # Positions 0-5 are parameters; 6-7 a buffer, which takes the plain average.
    optimizer = ServerOptimizer(hyper, np.arange(6))
    x = np.concatenate([x0, [3.0, 4.0]])
    for t, delta in enumerate(deltas):
        buffer_delta = np.array([0.5, -0.25]) * (t + 1)
        step = optimizer.update(np.concatenate([delta, buffer_delta]))
        x = x + step
        np.testing.assert_allclose(x[:6], expected[t], rtol=1e-12, atol=1e-15)
        assert step[6:].tolist() == buffer_delta.tolist()
    assert optimizer.steps == len(deltas)


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_two_optimizers_given_the_same_aggregates_hold_the_same_bits(name: str) -> None:
    # What every client relies on: the same inputs give the same bits, step after step.
    hyper = Hyper(name, LR, MOMENTUM, BETA1, BETA2, TAU)
    a, b = ServerOptimizer(hyper, np.arange(6)), ServerOptimizer(hyper, np.arange(6))
    for delta in _deltas():
        assert a.update(delta).tobytes() == b.update(delta.copy()).tobytes()


def test_fedavg_at_server_lr_1_is_the_plain_average() -> None:
    optimizer = ServerOptimizer(Hyper.of(RunConfig()), np.arange(6))
    assert not optimizer.stateful
    for delta in _deltas():
        assert optimizer.update(delta).tobytes() == delta.tobytes()


def test_server_lr_defaults_per_optimizer() -> None:
    assert Hyper.of(RunConfig()).lr == 1.0
    assert Hyper.of(RunConfig(server_optimizer="fedavgm")).lr == 1.0
    assert Hyper.of(RunConfig(server_optimizer="fedadam")).lr == 0.1
    assert Hyper.of(RunConfig(server_optimizer="fedadam", server_lr=0.03)).lr == 0.03


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"server_optimizer": "fedsgd"}, "server_optimizer must be one of"),
        ({"server_lr": 0.0}, "server_lr must be positive"),
        ({"beta2": 1.0}, "beta2 must be in [0, 1)"),
        ({"tau": 0.0}, "tau must be positive"),
        ({"fedprox_mu": -1.0}, "fedprox_mu must be 0"),
        ({"lr_schedule": "linear"}, "lr_schedule must be one of"),
        ({"lr_min": 1.0}, "lr_min must be between 0 and lr"),
    ],
)
def test_bad_optimization_settings_are_refused(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        replace(RunConfig(), **changes).validate()


# --- client learning rate across rounds ------------------------------------------------------


def test_lr_schedules_give_the_expected_lr_per_round() -> None:
    base = RunConfig(lr=0.1, rounds=4)
    constant = [client_lr(base, r) for r in range(1, 5)]
    assert constant == [0.1] * 4
    step = replace(base, lr_schedule="step", lr_step_rounds=2, lr_gamma=0.5)
    assert [client_lr(step, r) for r in range(1, 5)] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    cosine = replace(base, lr_schedule="cosine", lr_min=0.02)
    # (1 + cos(pi t / 4)) / 2 for t = 0..3: 1, 0.8536, 0.5, 0.1464
    expected = [0.02 + 0.08 * f for f in (1.0, 0.853553390593, 0.5, 0.146446609407)]
    assert [client_lr(cosine, r) for r in range(1, 5)] == pytest.approx(expected)
    # As torch's CosineAnnealingLR stepped once per round with T_max = rounds.
    weight = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([weight], lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=4, eta_min=0.02)
    torch_lrs = []
    for _ in range(4):
        torch_lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        schedule.step()
    assert [client_lr(cosine, r) for r in range(1, 5)] == pytest.approx(torch_lrs)


def test_the_round_context_tells_the_task_its_lr(tmp_path: Path) -> None:
    config = RunConfig(lr=0.2, rounds=3, lr_schedule="step", lr_step_rounds=1, lr_gamma=0.5)
    contexts = [_context(config, r) for r in (1, 2, 3)]
    assert [ctx.lr for ctx in contexts] == pytest.approx([0.2, 0.1, 0.05])


def _context(config: RunConfig, round_num: int) -> RoundContext:
    from secagg.task import Site

    site = Site(0, "site-1", 1, Path("data"))
    return RoundContext(round_num, config.rounds, site, torch.device("cpu"), 0, config)


# --- FedProx ----------------------------------------------------------------------------------


def test_the_proximal_term_is_mu_half_the_squared_distance_to_the_global_model() -> None:
    model = torch.nn.Linear(2, 1)
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    ctx = replace(_context(RunConfig(fedprox_mu=0.5), 1), anchor=anchor)
    assert float(ctx.proximal(model).detach()) == 0.0
    with torch.no_grad():
        model.weight += torch.tensor([[1.0, 2.0]])
        model.bias -= 2.0
    assert float(ctx.proximal(model).detach()) == pytest.approx(0.5 / 2 * (1 + 4 + 4))
    off = replace(_context(RunConfig(), 1), anchor=anchor)
    assert float(off.proximal(model).detach()) == 0.0


def _one_round_changes(config: RunConfig) -> list[np.ndarray]:
    """Every client's change after training round 1 of ``config``."""
    from secagg.builtin import task_for
    from secagg.crypto import SERVER, Stamp

    clients = build_clients(config, task_for(config))
    stamp = Stamp(bytes(16), 1, SERVER, len(clients))
    for client in clients:
        client.train(stamp)
    return [client._trained.change.copy() for client in clients if client._trained]


def test_fedprox_mu_0_trains_bit_identically_to_fedavg_and_mu_above_0_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = RunConfig(clients=2, local_epochs=1, tracking=False, device="cpu", alpha=0.5)
    with_mu_0 = _one_round_changes(replace(config, fedprox_mu=0.0))
    with_mu = _one_round_changes(replace(config, fedprox_mu=0.5))
    # FedAvg's local objective: the built-in loop with no proximal term at all.
    monkeypatch.setattr(RoundContext, "proximal", lambda self, model: 0)
    fedavg = _one_round_changes(config)
    for a, b, c in zip(with_mu_0, fedavg, with_mu, strict=True):
        assert a.tobytes() == b.tobytes()
        # The pull towards the global model makes the change smaller.
        assert np.linalg.norm(c) < np.linalg.norm(a)


# --- the state on every client, in order ----------------------------------------------------


def test_a_stateful_optimizer_refuses_an_aggregate_out_of_order() -> None:
    from secagg.crypto import SERVER, Stamp

    config = RunConfig(clients=1, server_optimizer="fedadam", tracking=False, device="cpu")
    (client,) = build_clients(config, _task(config))
    with pytest.raises(PayloadError, match="has applied 0 rounds and was given round 2") as err:
        client.apply(b"", Stamp(bytes(16), 2, SERVER, 1), None)
    assert err.value.reason == "out-of-order"


def _task(config: RunConfig):  # type: ignore[no-untyped-def]
    from secagg.builtin import task_for

    return task_for(config)


def _job(tmp_path: Path, keys: Path, **changes) -> RunConfig:  # type: ignore[no-untyped-def]
    base = RunConfig(
        keys_dir=str(keys),
        tracking=False,
        output_dir=str(tmp_path / "run"),
        device="cpu",
        clients=4,
        rounds=6,
        alpha=0.3,
        server_optimizer="fedadam",
    )
    return replace(base, **changes)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_server_optimizers_with_he_match_plaintext_every_round_on_the_digits_job(
    tmp_path: Path, session_keys: Path, optimizer: str
) -> None:
    """The default digits job (8 clients, 10 rounds): bit-identical accuracy in every round.
    With a server optimizer ``he_precision = auto`` packs 23-bit steps, fine enough that
    FedAdam's division by sqrt(v) + tau (which magnifies the rounding of small coordinates)
    and momentum (which carries it on) leave no trace here."""
    base = RunConfig(keys_dir=str(session_keys), tracking=False, device="cpu")
    base = replace(base, server_optimizer=optimizer)
    plain = run_job(replace(base, he=False, output_dir=str(tmp_path / "p")))
    he = run_job(replace(base, he=True, output_dir=str(tmp_path / "h")))
    assert he.config.precision == "fine"
    assert [r.value("accuracy") for r in he.rounds] == [r.value("accuracy") for r in plain.rounds]
    # And the optimizer did something: its model is not FedAvg's.
    fedavg = run_job(replace(base, server_optimizer="fedavg", output_dir=str(tmp_path / "a")))
    assert [r.value("accuracy") for r in fedavg.rounds] != [
        r.value("accuracy") for r in plain.rounds
    ]


def test_he_precision_auto_follows_the_server_optimizer() -> None:
    assert RunConfig(he=True).precision == "standard"
    assert RunConfig(he=True, server_optimizer="fedadam").precision == "fine"
    assert RunConfig(he=True, server_optimizer="fedadam", he_precision="standard").precision == (
        "standard"
    )
    assert RunConfig(he=True, he_precision="fine").precision == "fine"
    assert RunConfig(he=False, server_optimizer="fedadam").precision == "float32"
    with pytest.raises(ConfigError, match="he_precision must be one of auto, standard, fine"):
        RunConfig(he_precision="double").validate()


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_with_fedadam_ends_bit_identical_to_an_uninterrupted_run(
    tmp_path: Path, session_keys: Path
) -> None:
    config = _job(tmp_path, session_keys, he=True, clients=3)

    def stop_after_two(metrics) -> None:  # type: ignore[no-untyped-def]
        if metrics.round == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_job(config, on_round=stop_after_two)
    run_dir = Path(str(config.output_dir))
    resumed = run_job(config, resume_dir=run_dir)
    straight = run_job(replace(config, output_dir=str(tmp_path / "straight")))
    resumed_model = torch.load(run_dir / "model.pt")
    straight_model = torch.load(tmp_path / "straight" / "model.pt")
    # The replayed chain rebuilt the optimizer's moments too: otherwise round 3's step, and
    # every model after it, would differ.
    assert flatten(resumed_model)[0].tobytes() == flatten(straight_model)[0].tobytes()
    assert [m.value("accuracy") for m in resumed.rounds] == [
        m.value("accuracy") for m in straight.rounds
    ]


@pytest.mark.slow
def test_the_settings_reach_grpc_sites_and_train_as_in_process(
    tmp_path: Path, session_keys: Path
) -> None:
    import json
    import subprocess
    import sys

    flags = ["--server-optimizer", "fedadam", "--fedprox-mu", "0.01", "--lr-schedule", "cosine"]
    base = [sys.executable, "-m", "secagg.cli", "run", "--clients", "2", "--rounds", "2", "--he"]
    base += [*flags, "--keys", str(session_keys), "--no-tracking", "--device", "cpu"]
    for where, extra in (("g", ["--transport", "grpc"]), ("l", [])):
        done = subprocess.run(
            [*base, "--output", where, *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    config = json.loads((tmp_path / "g" / "results.json").read_text())["config"]
    assert config["server_optimizer"] == "fedadam" and config["lr_schedule"] == "cosine"
    # Each site process trains with its own torch thread count, so training's float reductions
    # may differ in their last bits; FedAdam scales a change near 0 by at most about
    # server_lr * (1 - beta1) / tau = 10, so the models agree to 1e-4, not bit for bit.
    local = torch.load(tmp_path / "l" / "model.pt")
    grpc = torch.load(tmp_path / "g" / "model.pt")
    assert local.keys() == grpc.keys()
    for name, value in local.items():
        assert torch.allclose(grpc[name], value, atol=1e-4), name
