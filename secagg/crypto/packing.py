"""Integer packing: several quantized values per plaintext coefficient, exact after summing.

A ciphertext carries one integer per coefficient of its plaintext polynomial (``rlwe``), scaled
by ``Delta = 2**scale_bits`` so the encryption noise (at most 21 per client, ``NOISE_BOUND``,
with certainty) stays below half a unit of the sum. With one 60-bit data prime and a scale of
2**13, a coefficient carries an integer of up to 2**45 in magnitude that decrypts *exactly*
after adding the ciphertexts of up to 128 clients (see ``PackedParams``). A ciphertext of N
coefficients costs 7.5 bytes per coefficient (its ``c0`` alone travels, 60 bits a word;
``seeded``, ``seal_format.to_wire``), shared by:

- ``standard``: three 15-bit digits per coefficient, 2.5 bytes per value;
- ``fine``: two 23-bit digits per coefficient, 3.75 bytes per value (float32 plaintext sends
  4), 256 times finer steps.

Digits are balanced (signed): a slot holds ``d0 + d1 * 2**B + d2 * 2**(2B)`` with every digit in
``[-2**(B-1), 2**(B-1))``. Adding slots adds digits; it stays exact as long as every *summed*
digit stays inside that range, which is what the per-client bound ``value_bound`` guarantees:
clients weight their values by ``p_i = n_i / N`` (the weights sum to at most 1), so a sum of
values each at most ``p_i * L`` plus a rounding half stays within ``L + clients / 2``.
("Slot" here is one packed integer: one coefficient of the plaintext.)

Some values must not be quantized to B bits (the total weight, the clipped count): they go in
the *tail*, one whole slot each.

Every party derives a round's packing from the job's precision and the round's size alone
(``packing_for``); the packing is part of the envelope's codec settings, so a client and a
server that disagree refuse each other's payloads by name.

This module holds the packing's parameters, which the server reads too; ``codec`` packs and
unpacks (clients only), and ``rlwe`` encrypts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secagg.crypto.seal_format import NOISE_BOUND
from secagg.errors import ConfigError


@dataclass(frozen=True)
class PackedParams:
    """How quantized integers share CKKS slots.

    ``values_per_slot`` x ``digit_bits`` plus ``scale_bits`` must stay below the data prime
    minus one bit: a balanced slot value is below ``2**(k*B - 1)``, so its scaled coefficients
    stay below a quarter of the prime. Half the scale must exceed the summed noise of
    ``max_clients`` clients (``NOISE_BOUND`` each), so every sum decrypts exactly.
    """

    values_per_slot: int = 3
    digit_bits: int = 15
    scale_bits: int = 13
    max_clients: int = 128

    @property
    def digit_limit(self) -> int:
        """Summed digits must lie in ``[-digit_limit, digit_limit)``."""
        return 1 << (self.digit_bits - 1)

    @property
    def tail_limit(self) -> int:
        """Largest magnitude of a summed whole-slot (tail) integer."""
        return 1 << (self.values_per_slot * self.digit_bits - 1)

    def check(self, data_prime_bits: int) -> None:
        """Refuse a setting where a sum could wrap the modulus or noise could flip a digit."""
        used = self.values_per_slot * self.digit_bits + self.scale_bits
        if used > data_prime_bits - 1:
            raise ConfigError(
                f"packing {self.values_per_slot} x {self.digit_bits} bits at scale "
                f"2^{self.scale_bits} needs {used + 1} bits, the data prime has "
                f"{data_prime_bits}"
            )
        if NOISE_BOUND * self.max_clients >= 1 << (self.scale_bits - 1):
            raise ConfigError(
                f"scale 2^{self.scale_bits} is too small to decrypt the sum of "
                f"{self.max_clients} clients exactly"
            )

    @property
    def sum_limit(self) -> int:
        """Largest magnitude a summed value may reach: the balanced digit's."""
        return self.digit_limit - 1

    def check_clients(self, clients: int) -> None:
        """Refuse more clients per round than any packing's noise budget allows."""
        if not 1 <= clients <= WIDE.max_clients:
            raise ConfigError(
                f"HE aggregation sums at most {WIDE.max_clients} clients per round, this job "
                f"has {clients} per round; set clients_per_round (--clients-per-round) to "
                f"{WIDE.max_clients} or fewer"
            )

    def slots_for(self, values: int, tail: int) -> int:
        return math.ceil(values / self.values_per_slot) + tail


#: Rounds of up to 128 clients, ``standard`` precision: three 15-bit digits per slot at scale
#: 2^13 (128 x 21 = 2,688 of summed noise stays below half of 2^13).
PACKED = PackedParams()
#: Rounds of up to 128 clients, ``fine`` precision: two 23-bit digits per slot at scale 2^13.
#: A server optimizer carries rounding from one round into the next (momentum), and the
#: adaptive ones divide each coordinate by its own running magnitude, which magnifies the
#: rounding of small coordinates: with 23-bit digits FedAdam, FedYogi, FedAdagrad and FedAvgM
#: end every round of the digits job exactly where plaintext does (with 15-bit digits the
#: adaptive ones end some rounds one test image apart).
FINE = PackedParams(values_per_slot=2, digit_bits=23, scale_bits=13)
#: Rounds of 129 to 1,024 clients, either precision: the summed noise of up to 1,024
#: ciphertexts needs scale 2^16, which leaves room for two 21-bit digits per slot. Each
#: client's weighted share of a sum is about 1/c of it, so many clients need finer steps, not
#: coarser ones: 2 x 21 bits keeps the precision of 128 clients at 3 x 15 bits (three 14-bit
#: digits would fit too, and would lose two orders of magnitude).
WIDE = PackedParams(values_per_slot=2, digit_bits=21, scale_bits=16, max_clients=1024)
#: Every packing a round may use.
PACKINGS = (PACKED, FINE, WIDE)


def packing_for(clients: int, precision: str = "standard") -> PackedParams:
    """The packing of a round of ``clients`` clients at ``precision`` (``standard`` or
    ``fine``): above 128 clients the noise budget leaves one choice, ``WIDE``."""
    if clients > PACKED.max_clients:
        return WIDE
    return FINE if precision == "fine" else PACKED
