"""t-of-n shares of the self-mask keys (``secagg.crypto.shares``)."""

from __future__ import annotations

import itertools
import os

import pytest

from secagg.crypto import shares
from secagg.errors import PayloadError


def test_any_threshold_shares_rebuild_the_key_and_fewer_do_not() -> None:
    key = os.urandom(32)
    split = shares.split(key, range(6), threshold=4)
    for chosen in itertools.combinations(range(6), 4):
        assert shares.combine({p: split[p] for p in chosen}, 32) == key
    # Three shares of a degree-3 polynomial fit every key alike: they interpolate to an
    # unrelated field element (what the commitment or advertised key a rebuild is checked
    # against refuses), or one that is no 32-byte key at all.
    for chosen in itertools.combinations(range(6), 3):
        try:
            assert shares.combine({p: split[p] for p in chosen}, 32) != key
        except PayloadError as err:
            assert "do not rebuild" in str(err)


def test_sealed_shares_open_only_for_their_pair_and_context() -> None:
    pair, context = os.urandom(32), b"job round attempt"
    sealed = shares.seal(pair, context, 1, 2, b"the shares")
    assert shares.open_sealed(pair, context, 1, 2, sealed) == b"the shares"
    for wrong in (
        (os.urandom(32), context, 1, 2, sealed),
        (pair, b"another attempt", 1, 2, sealed),
        (pair, context, 2, 1, sealed),
        (pair, context, 1, 2, sealed[:-1] + bytes([sealed[-1] ^ 1])),
    ):
        with pytest.raises(PayloadError, match="do not open") as caught:
            shares.open_sealed(*wrong)
        assert caught.value.reason == "bad-share"
