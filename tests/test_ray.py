"""--transport ray on a real local Ray (and a two-node cluster simulated on this machine, as
Ray's own tests do): the same round code and results as in-process, clients spread over nodes,
a worker killed mid-round handled as a client that dropped out."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from secagg.config import RunConfig  # noqa: E402
from secagg.job import run_job  # noqa: E402

#: A task that kills its own worker process while training, in one round, on one site.
DYING_TASK = """
import os

from secagg.builtin import Classification


class DiesOnce(Classification):
    def __init__(self, site: int = 1, round: int = 2) -> None:
        super().__init__()
        self.site, self.round = site, round

    def train(self, model, data, ctx):
        if ctx.site.index == self.site and ctx.round == self.round:
            os._exit(1)  # the worker is gone, mid-round, as if killed
        return super().train(model, data, ctx)
"""


def _config(tmp_path: Path, keys: Path, **changes) -> RunConfig:  # type: ignore[no-untyped-def]
    base = RunConfig(
        clients=3,
        rounds=2,
        he=True,
        keys_dir=str(keys),
        tracking=False,
        output_dir=str(tmp_path / "run"),
        client_cpus=0.5,
    )
    return replace(base, **changes)


@pytest.mark.slow
def test_ray_equals_in_process_bit_for_bit_with_he(tmp_path: Path, session_keys: Path) -> None:
    """Every transport sets the job's ``torch_threads`` (float sums in training depend on the
    thread count, nothing else): two here, against a driver process left at one."""
    threads = torch.get_num_threads()
    try:
        local = run_job(_config(tmp_path / "local", session_keys, torch_threads=2))
    finally:
        torch.set_num_threads(threads)
    # The driver sums with the public context; only the actors read the secret key.
    from secagg import keys

    def refuse(keys_dir):  # type: ignore[no-untyped-def]
        raise AssertionError("the Ray driver read client.ctx")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keys, "load_for_client", refuse)
        on_ray = run_job(_config(tmp_path / "ray", session_keys, transport="ray", torch_threads=2))
    assert [m.value("accuracy") for m in on_ray.rounds] == [
        m.value("accuracy") for m in local.rounds
    ]
    assert [m.bytes_up for m in on_ray.rounds] == [m.bytes_up for m in local.rounds]
    ray_model = torch.load(tmp_path / "ray" / "run" / "model.pt")
    for name, value in torch.load(tmp_path / "local" / "run" / "model.pt").items():
        assert torch.equal(ray_model[name], value), name
    assert not ray.is_initialized()  # the run started its own Ray and shut it down


@pytest.mark.slow
def test_a_two_node_cluster_runs_a_sampled_job_across_both(
    tmp_path: Path, session_keys: Path
) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        from secagg.transport.ray import RayTransport

        config = _config(tmp_path, session_keys, client_cpus=1.0)
        config = replace(config, transport="ray", ray_address=cluster.address)
        transport = RayTransport(config.validate())
        assert len(transport.nodes()) == 2  # three clients of one CPU: no node holds them all
        transport.close()
        sampled = replace(config, clients=12, clients_per_round=2, rounds=2)
        result = run_job(replace(sampled, output_dir=str(tmp_path / "cluster")))
        assert [m.clients for m in result.rounds] == [2, 2]
        assert result.final > 0.2
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_a_worker_killed_mid_round_is_a_client_that_dropped_out(
    tmp_path: Path, session_keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A masked Ray run (keys made per actor, signed with simulated site keys derived in
    each process) where site 1's worker dies while training round 2: the round goes on with
    the survivors, the server rebuilding its mask keys from their shares, and ends as the
    unmasked run's does."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "dying.py").write_text(DYING_TASK)
    monkeypatch.syspath_prepend(str(package))
    path = os.pathsep.join(p for p in (str(package), os.environ.get("PYTHONPATH", "")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    config = _config(
        tmp_path,
        session_keys,
        task="dying:DiesOnce",
        transport="ray",
        rounds=3,
        min_clients=2,
        threshold=2,
    )
    assert config.masking  # masked: the worker died after it got round 2's keys
    result = run_job(config)
    # Round 2 goes on with the two clients left (the average stays right: the ledger), and
    # round 3 has all three again, the dead worker replaced.
    assert [m.clients for m in result.rounds] == [3, 2, 3]
    assert result.rounds[-1].value("accuracy") > 0.5
    # The survivors revealed their shares of its mask keys, and the server removed its pairs:
    # every round as the unmasked run's, for a few hundred bytes a client, dropout or not.
    plain = run_job(replace(config, masking=False, output_dir=str(tmp_path / "unmasked")))
    for m, u in zip(result.rounds, plain.rounds, strict=True):
        assert (m.value("accuracy"), m.loss) == (u.value("accuracy"), u.loss), f"round {m.round}"
        assert u.bytes_up < m.bytes_up <= 1.02 * u.bytes_up
    sys.modules.pop("dying", None)

    # With every client required, the round fails with the reason, is tried again with a
    # fresh worker (which dies again), and the run stops with the reason; round 1 stands.
    from secagg.rounds import RoundFailed

    strict = replace(config, min_clients=0, round_retries=1, output_dir=str(tmp_path / "strict"))
    with pytest.raises(RoundFailed, match="round 2: only 2 client"):
        run_job(strict)
    state = (tmp_path / "strict" / "state.json").read_text()
    assert '"round": 1' in state


class _SlowRay:
    """Ray's module as a loaded machine shows it: the first local starts time out."""

    def __init__(self, failures: int) -> None:
        self.failures, self.starts, self.shutdowns = failures, 0, 0

    def init(self, **kwargs):  # type: ignore[no-untyped-def]
        self.starts += 1
        if self.starts <= self.failures:
            raise Exception("The current node timed out during startup. This could happen ...")

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_local_ray_that_starts_slowly_is_started_again(tmp_path: Path) -> None:
    from secagg.transport.ray import LOCAL_STARTS, _start

    config = RunConfig(transport="ray", output_dir=str(tmp_path))
    slow = _SlowRay(failures=LOCAL_STARTS - 1)
    with pytest.warns(UserWarning, match="did not start in time"):
        _start(slow, config, actors=3)
    assert slow.starts == LOCAL_STARTS and slow.shutdowns == LOCAL_STARTS - 1
    never = _SlowRay(failures=LOCAL_STARTS)
    with pytest.warns(UserWarning), pytest.raises(Exception, match="timed out during startup"):
        _start(never, config, actors=3)
    assert never.starts == LOCAL_STARTS  # and no more: the last error is the run's


def test_joining_a_cluster_is_tried_once(tmp_path: Path) -> None:
    from secagg.transport.ray import _start

    config = RunConfig(transport="ray", ray_address="10.0.0.1:6379", output_dir=str(tmp_path))
    slow = _SlowRay(failures=1)
    with pytest.raises(Exception, match="timed out"):
        _start(slow, config, actors=3)
    assert slow.starts == 1
