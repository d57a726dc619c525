"""CKKS parameters and one party's key material: plain values, no crypto library."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters for ``secagg keygen``.

    The default is one 60-bit data prime plus a 60-bit special prime at N=8192: the server
    only adds ciphertexts (multiplicative depth zero), so one data prime is enough and a
    ciphertext travels as one polynomial of that prime (its ``c0``; ``c1`` is a seed): 60
    bits per coefficient, 2.5 bytes per packed value (``standard``). The packed codec needs
    the 60-bit data prime (``secagg.crypto.packing``); its scale is the codec's own.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)


@dataclass(frozen=True)
class Keys:
    """One party's key material: a serialized TenSEAL context and what identifies it."""

    context: bytes
    fingerprint: bytes
    params: CkksParams
