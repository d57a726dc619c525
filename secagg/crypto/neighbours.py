"""Who masks with whom in a large round: the neighbour graph (SecAgg+, Bell et al., CCS 2020).

In a round of up to the policy's ``graph_above`` keyed positions every pair of clients shares a
mask (the full graph), so a client's masking work grows with the round. Above it, each client
masks only with its *neighbours*: the ``picks`` positions it chose, and those that chose it.
It seals the shares of its self-mask keys to its own picks alone (any ``pick_threshold`` of
them rebuild a key), and it reveals anything for a survivor set only when at least
``pick_threshold`` of its picks are in the set and signed it.

A client's picks are a hash of its own signed mask key (``picks``): randomness it drew itself,
which the server cannot choose (it relays the key signed) and colluding sites cannot steer
(their keys decide only their own picks: picking a victim adds masks to it, takes none away).
The round's positions are fixed before any key is relayed, so every client computes the same
graph from the same keys, with no message more. What protects one update is then its own
picks: a lying server learns it only with ``pick_threshold`` colluders among a client's
``picks`` random picks, a binomial tail (``exposure``), where the full graph needs
``threshold`` colluders in the round.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from functools import lru_cache
from math import comb

import numpy as np

_LABEL = b"secagg neighbour picks v1\0"


@lru_cache(maxsize=1 << 16)
def picks(
    job: bytes, site: int, public: bytes, position: int, roster: int, count: int
) -> frozenset[int]:
    """The ``count`` positions of a ``roster``-position round that the client at ``position``,
    with the mask key ``public`` of ``site``, masks with: distinct, never its own, drawn from
    SHA-3 of the key (the same for every client that reads the same relayed key)."""
    count = min(count, roster - 1)
    seed = _LABEL + job + struct.pack(">II", site, roster) + public
    chosen: dict[int, None] = {}
    words = 2 * count + 8
    while True:
        stream = hashlib.shake_256(seed).digest(8 * words)
        # 64-bit draws reduced mod the roster: a bias of roster / 2^64, none in practice.
        for value in (np.frombuffer(stream, dtype=">u8") % np.uint64(roster)).tolist():
            if value != position:
                chosen.setdefault(value)
                if len(chosen) == count:
                    return frozenset(chosen)
        words *= 2  # a short stream (only tiny rosters need it): draw a longer one


def graph(
    job: bytes,
    keys: Sequence[tuple[int, bytes] | None],
    own: int,
    count: int,
) -> tuple[frozenset[int], frozenset[int]]:
    """The client at position ``own``'s picks among the round's keyed positions, and all its
    neighbours (its picks and the keyed positions that picked it); ``keys[p]`` is position
    ``p``'s (site, public key), None where the round keyed no one."""
    roster = len(keys)
    keyed = {p for p, key in enumerate(keys) if key is not None}
    mine = keys[own]
    assert mine is not None
    chosen = picks(job, mine[0], mine[1], own, roster, count) & keyed
    chose_me = {
        p
        for p, key in enumerate(keys)
        if key is not None and p != own and own in picks(job, key[0], key[1], p, roster, count)
    }
    return frozenset(chosen), frozenset(chosen | chose_me)


def exposure(picks_made: int, threshold: int, colluding: float) -> float:
    """The chance that a lying server with a ``colluding`` fraction of a round's sites reads
    one given client's update in a graph round: ``threshold`` or more of its ``picks_made``
    uniformly random picks collude (a binomial tail)."""
    return sum(
        comb(picks_made, k) * colluding**k * (1 - colluding) ** (picks_made - k)
        for k in range(threshold, picks_made + 1)
    )
