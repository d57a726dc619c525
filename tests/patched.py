"""``secagg`` with one fault patched in, for tests that need a party to misbehave on cue:

python tests/patched.py die-after-keys:2 client --kit ...   # dies once it agreed round 2's keys
python tests/patched.py die-at-seal:2 client --kit ...      # dies when asked for round 2's update
python tests/patched.py forge-key:KIT server job.toml ...   # relays site 2's key forged with
                                                            # KIT's certificate (another CA)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def _die_after_keys(round_num: int) -> None:
    from secagg.client import Client

    train = Client.train

    def dying(self: Client, stamp: Any, peers: Any = (), nonce: bytes = b"") -> Any:
        if stamp.round_num == round_num:
            self.cipher.agree(stamp, peers, nonce)
            os._exit(3)
        return train(self, stamp, peers, nonce)

    Client.train = dying  # type: ignore[method-assign]


def _die_at_seal(round_num: int) -> None:
    from secagg.transport.grpc_client import Site

    seal = Site.do_seal

    def dying(self: Site, task: dict[str, Any]) -> None:
        if int(task["round"]) == round_num:
            os._exit(3)
        seal(self, task)

    Site.do_seal = dying  # type: ignore[method-assign]


def _forge_key(kit_dir: str) -> None:
    """The server relays, in site 2's place, a key signed with another project's site-2
    certificate: a man in the middle that a check of the signature alone would let through."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from secagg.crypto import masking
    from secagg.provision import load_kit
    from secagg.transport.coordinator import Coordinator
    from secagg.transport.grpc_wire import MaskKey

    kit = load_kit(kit_dir, "client")
    signer = serialization.load_pem_private_key(kit.private_key, password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    relay = Coordinator.mask_keys

    def forged(self: Coordinator, sites: frozenset[int]) -> list[dict[str, Any] | None]:
        keys = relay(self, sites)
        public = X25519PrivateKey.generate().public_key().public_bytes_raw()
        signed = masking._signed_bytes(self.job, 1, public)
        signature = signer.sign(signed, ec.ECDSA(hashes.SHA256()))
        keys[1] = MaskKey(1, public, signature, kit.certificate).to_wire()
        return keys

    Coordinator.mask_keys = forged  # type: ignore[method-assign]


FAULTS = {"die-after-keys": _die_after_keys, "die-at-seal": _die_at_seal, "forge-key": _forge_key}

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    fault, _, argument = sys.argv[1].partition(":")
    FAULTS[fault](int(argument) if argument.isdigit() else argument)  # type: ignore[operator]
    from secagg.cli import main

    main(sys.argv[2:], prog_name="secagg")
