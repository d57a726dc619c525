"""RayTransport's round bookkeeping, with stand-ins for Ray and its actors (no Ray needed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from secagg.crypto import SERVER, Stamp
from secagg.transport.ray import RayTransport


class _Call:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)  # the "object ref" is the result itself


class _Actor:
    def __init__(self, index: int) -> None:
        self.site = index
        self.evaluated = 0
        self.become = _Call(self._become)
        self.evaluate = _Call(self._evaluate)

    def _become(self, index: int) -> None:
        self.site = index

    def _evaluate(self, stamp: Stamp, unmasked: bool = False) -> Any:
        self.evaluated += 1
        return SimpleNamespace(site=self.site) if self.site == 0 else None


def _transport(chosen: list[int]) -> tuple[RayTransport, list[_Actor], _Actor]:
    transport = RayTransport.__new__(RayTransport)
    fake_ray = SimpleNamespace(
        get=lambda refs: refs,
        exceptions=SimpleNamespace(RayTaskError=KeyError, RayActorError=LookupError),
    )
    slots = [_Actor(i) for i in chosen]
    evaluator = _Actor(0)
    transport.ray, transport.slots, transport.evaluator = fake_ray, slots, evaluator
    transport._chosen = chosen
    transport.roster = len(chosen)
    return transport, slots, evaluator


def _stamp(transport: RayTransport) -> Stamp:
    """Round 1's evaluation by the transport's evaluating clients."""
    return Stamp(bytes(16), 1, SERVER, 3).evaluation(transport.evaluators(1))


def test_client_0_evaluates_once_when_a_round_draws_it() -> None:
    # Drawn: its slot evaluates, the evaluator (client 0 too) does not count it again.
    transport, _, evaluator = _transport([0, 5, 9])
    assert [r.site for r in transport.evaluate(_stamp(transport))] == [0]
    assert evaluator.evaluated == 0
    # Not drawn: the evaluator evaluates.
    transport, _, evaluator = _transport([3, 5, 9])
    assert [r.site for r in transport.evaluate(_stamp(transport))] == [0]
    assert evaluator.evaluated == 1
