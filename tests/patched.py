"""``secagg`` with one fault patched in, for tests that need a party to misbehave on cue:

python tests/patched.py die-after-keys:2 client --kit ...   # dies once it advertised and agreed
                                                            # round 2's keys
python tests/patched.py die-at-seal:2 client --kit ...      # dies when asked for round 2's update
python tests/patched.py die-at-reveal:2 client --kit ...     # dies when asked to unmask round
                                                            # 2's update (after confirming it)
python tests/patched.py forge-key:KIT server job.toml ...   # relays site 2's key forged with
                                                            # KIT's certificate (another CA)
python tests/patched.py lie-dropout:DIR server job.toml ... # claims site-1 dropped out of the
                                                            # update phase though it delivered;
                                                            # dumps its update and, rebuilt from
                                                            # the shares, its pairs into DIR
python tests/patched.py lie-small:2 server job.toml ...     # keys each round to 2 sites only
python tests/patched.py bad-key client --kit ...            # joins with a badly signed mask key
python tests/patched.py bad-advert client --kit ...         # advertises badly signed attempt keys
python tests/patched.py retry-split server job.toml ...     # round 1 by site-1 and site-2, then
                                                            # (failed) by site-3 and site-4
python tests/patched.py lie-retry server job.toml ...       # fails round 1 once its update was
                                                            # unmasked, and tries it again
python tests/patched.py lie-split server job.toml ...       # shows site-1 another survivor set
python tests/patched.py crash-unmasked:2 server job.toml  # dies once round 2's update was
                                                            # unmasked, before its checkpoint
python tests/patched.py lie-count client --kit ...          # encrypts its sample count times
                                                            # 10^9 inside its scale payload
python tests/patched.py skip-policy server job.toml ...   # serves a job weaker than its
                                                            # kits' policy (plaintext, say)
python tests/patched.py record:DIR server job.toml ...      # writes every upload header and
                                                            # report it receives into DIR
python tests/patched.py replay-attempt:DIR server job.toml  # retries round 1 with site-1's scales
                                                            # of the first attempt; dumps the
                                                            # retry's unmasked scales into DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def _die_after_keys(round_num: int) -> None:
    from secagg.client import Client

    train = Client.train

    def dying(
        self: Client, stamp: Any, adverts: Any = (), sealed: Any = None, nonce: bytes = b""
    ) -> Any:
        if stamp.round_num == round_num:
            self.cipher.agree(stamp, adverts, sealed or {}, nonce)
            os._exit(3)
        return train(self, stamp, adverts, sealed, nonce)

    Client.train = dying  # type: ignore[method-assign]


def _die_at_seal(round_num: int) -> None:
    from secagg.transport.grpc_client import Site

    seal = Site.do_seal

    def dying(self: Site, task: dict[str, Any]) -> None:
        if int(task["round"]) == round_num:
            os._exit(3)
        seal(self, task)

    Site.do_seal = dying  # type: ignore[method-assign]


def _die_at_reveal(round_num: int) -> None:
    from secagg.transport.grpc_client import Site

    correct = Site.do_correct

    def dying(self: Site, task: dict[str, Any]) -> None:
        if int(task["round"]) == round_num and task.get("phase") == "update":
            os._exit(3)
        correct(self, task)

    Site.do_correct = dying  # type: ignore[method-assign]


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


def _lie_dropout(folder: str) -> None:
    """The update phase's survivors are told site-1 (position 0) dropped out, though the
    server holds its update: they reveal their shares of its mask key, from which the server
    rebuilds the key and every pair mask on site-1's update. It dumps into ``folder`` the
    update (``victim.bin``) and the words of those pairs (``pairs.npy``): what a colluding
    site would decrypt is the update minus them."""
    import numpy as np

    from secagg.crypto import envelope, masking
    from secagg.transport.grpc_server import GrpcTransport

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    seal, unmask = GrpcTransport.seal, GrpcTransport.unmask

    def keeping(self: GrpcTransport, stamp: Any, total: int, scales: Any) -> Any:
        for reply in seal(self, stamp, total, scales):
            if reply.client_id == 0:
                (out / "victim.bin").write_bytes(reply.payload)
            yield reply

    def lying(self: GrpcTransport, stamp: Any, survivors: tuple[int, ...]) -> Any:
        if stamp.phase != envelope.UPDATE_PHASE or 0 not in survivors:
            return unmask(self, stamp, survivors)
        reveals = unmask(self, stamp, tuple(p for p in survivors if p != 0))
        roster = self.masks(stamp.round_num)
        own = roster.adverts[0]
        key = masking._rebuilt_mask_key(0, reveals, own.public(stamp.phase))
        halves = []
        for peer in sorted(roster.pairs_of(0)):
            public = roster.adverts[peer].public(stamp.phase)
            secret = masking._agreed(key, public, own.public(stamp.phase), peer)
            halves.append(masking._prg_key(secret, stamp, roster.nonce))
        victim = self.c.cipher.check((out / "victim.bin").read_bytes(), stamp)
        shape = self.c.cipher._shape
        words = masking.MaskPlan(tuple(halves), ()).words(
            victim.blob_count, shape.poly_modulus_degree, shape.modulus
        )
        np.save(out / "pairs.npy", words)
        return reveals

    GrpcTransport.seal = keeping  # type: ignore[method-assign]
    GrpcTransport.unmask = lying  # type: ignore[method-assign]


def _crash_unmasked(round_num: int) -> None:
    """The server process dies once round ``round_num``'s update phase is unmasked: every
    site sent, confirmed and revealed for the attempt, and the round is not checkpointed."""
    from secagg.crypto import envelope
    from secagg.transport.grpc_server import GrpcTransport

    unmask = GrpcTransport.unmask

    def dying(self: GrpcTransport, stamp: Any, survivors: tuple[int, ...]) -> Any:
        reveals = unmask(self, stamp, survivors)
        if stamp.round_num == round_num and stamp.phase == envelope.UPDATE_PHASE:
            os._exit(9)
        return reveals

    GrpcTransport.unmask = dying  # type: ignore[method-assign]


def _lie_count(_: str) -> None:
    """This site inflates its sample count inside the encryption (its task reports an honest
    one, so its own check passes): only the summed total can show it."""
    from secagg.crypto.quantized import QuantizedCipher

    prepare = QuantizedCipher.prepare

    def lying(self: QuantizedCipher, change: Any, stamp: Any, samples: int = 1, *rest: Any) -> Any:
        return prepare(self, change, stamp, samples * 10**9, *rest)

    QuantizedCipher.prepare = lying  # type: ignore[method-assign]


def _lie_retry(_: str) -> None:
    """Round 1 'fails' after its update was unmasked (the server holds the sum), and is tried
    again: a colluding site could difference the two sums if any site sent its update twice."""
    from secagg.rounds import RoundFailed
    from secagg.transport.grpc_server import GrpcTransport

    apply = GrpcTransport.apply
    failed: list[int] = []

    def lying(self: GrpcTransport, stamp: Any, payload: bytes, scales: Any) -> Any:
        if not failed:
            failed.append(stamp.round_num)
            raise RoundFailed(f"round {stamp.round_num}: patched to fail after unmasking")
        return apply(self, stamp, payload, scales)

    GrpcTransport.apply = lying  # type: ignore[method-assign]


def _lie_small(size: int) -> None:
    """Every round is keyed to ``size`` sites only, whatever the policy says."""
    from secagg.transport.coordinator import Coordinator

    wait = Coordinator.wait_for_sites

    def few(self: Coordinator, *args: Any, **kwargs: Any) -> frozenset[int]:
        return frozenset(sorted(wait(self, *args, **kwargs))[:size])

    Coordinator.wait_for_sites = few  # type: ignore[method-assign]


def _lie_split(_: str) -> None:
    """site-1 is shown the survivor set without site-3, the others the true one; each gets
    every site's confirmation."""
    from secagg.transport.coordinator import Coordinator

    post, next_task = Coordinator.post, Coordinator.next_task
    views: dict[int, list[int]] = {}

    def split(self: Coordinator, kind: str, round_num: int, sites: Any, **body: Any) -> Any:
        task = post(self, kind, round_num, sites, **body)
        if kind in ("confirm", "correct"):
            views[task.id] = [p for p in body["survivors"] if p != 2]
        return task

    def shown(self: Coordinator, site: Any, after: int, wait: float) -> dict[str, Any]:
        task = next_task(self, site, after, wait)
        if site.index == 0 and task.get("id") in views:
            task = {**task, "survivors": views[task["id"]]}
        return task

    Coordinator.post = split  # type: ignore[method-assign]
    Coordinator.next_task = shown  # type: ignore[method-assign]


def _bad_key(_: str) -> None:
    """This site joins with its mask key signed wrongly (a buggy or hostile site)."""
    from dataclasses import replace

    from secagg.transport.grpc_client import Site

    mask_key = Site.mask_key

    def bad(self: Site) -> Any:
        key = mask_key(self)
        return None if key is None else replace(key, signature=bytes(len(key.signature)))

    Site.mask_key = bad  # type: ignore[method-assign]


def _bad_advert(_: str) -> None:
    """This site signs its attempt keys wrongly (a buggy or hostile site)."""
    from dataclasses import replace

    from secagg.crypto.masking import Masker

    advertise = Masker.advertise

    def bad(self: Masker, *args: Any) -> Any:
        made = advertise(self, *args)
        return replace(made, advert=replace(made.advert, signature=bytes(64)))

    Masker.advertise = bad  # type: ignore[method-assign]


def _retry_split(_: str) -> None:
    """Round 1's first attempt is keyed to site-1 and site-2 only; once they sealed (and so
    fetched its scales), the round 'fails' and is tried again with site-3 and site-4 (the first
    two sit it out). Every site then applies the second attempt's aggregate."""
    from secagg.rounds import RoundFailed
    from secagg.transport.coordinator import Coordinator
    from secagg.transport.grpc_server import GrpcTransport

    apply, wait = GrpcTransport.apply, Coordinator.wait_for_sites
    tries: list[int] = []

    def failing(self: GrpcTransport, stamp: Any, payload: bytes, scales: Any) -> Any:
        if not tries:
            tries.append(1)
            raise RoundFailed("round 1: patched to fail after its first attempt")
        return apply(self, stamp, payload, scales)

    def split(self: Coordinator, round_num: int, *args: Any, **kwargs: Any) -> frozenset[int]:
        sites = wait(self, round_num, *args, **kwargs)
        if round_num != 1:
            return sites
        return sites - ({0, 1} if tries else {2, 3})

    GrpcTransport.apply = failing  # type: ignore[method-assign]
    Coordinator.wait_for_sites = split  # type: ignore[method-assign]


def _replay_attempt(folder: str) -> None:
    """Round 1's first attempt 'fails' once its scales are in (no site has sent its update,
    so none sits the retry out); in the retry, site-1's scale payload is replaced by its
    first attempt's, a valid ciphertext under an envelope that passes. The retry's unmasked
    scale sum is dumped into ``folder`` (what a colluding site would decrypt)."""
    from dataclasses import replace

    from secagg.rounds import RoundFailed
    from secagg.transport.grpc_server import GrpcTransport

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    train, seal = GrpcTransport.train, GrpcTransport.seal
    kept: dict[int, bytes] = {}

    def replaying(self: GrpcTransport, stamp: Any) -> Any:
        replies = train(self, stamp)
        if not kept:
            kept.update({r.client_id: r.scales for r in replies if r.scales})
            raise RoundFailed(f"round {stamp.round_num}: patched to fail after its scales")
        return [replace(r, scales=kept[0]) if r.client_id == 0 else r for r in replies]

    def dumping(self: GrpcTransport, stamp: Any, total: int, scales: Any) -> Any:
        (out / "scales.bin").write_bytes(scales)
        return seal(self, stamp, total, scales)

    GrpcTransport.train = replaying  # type: ignore[method-assign]
    GrpcTransport.seal = dumping  # type: ignore[method-assign]


def _record(folder: str) -> None:
    """A curious server: every upload header and report it receives, as it arrives, is
    written to ``folder``/seen.jsonl (site, task kind, message)."""
    import json

    from secagg.transport.coordinator import Coordinator

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    check, report = Coordinator.check_upload, Coordinator.report

    def write(site: Any, kind: str, message: Any) -> None:
        line = json.dumps({"site": site.name, "kind": kind, "message": message}, default=str)
        with (out / "seen.jsonl").open("a") as seen:
            seen.write(line + "\n")

    def checking(self: Coordinator, site: Any, header: Any) -> Any:
        task = self.task
        write(site, task.kind if task is not None else "?", header.to_wire())
        return check(self, site, header)

    def reporting(self: Coordinator, site: Any, message: Any) -> None:
        write(site, "report", message.to_wire())
        report(self, site, message)

    Coordinator.check_upload = checking  # type: ignore[method-assign]
    Coordinator.report = reporting  # type: ignore[method-assign]


def _skip_policy(_: str) -> None:
    """The server serves a job weaker than its kits' policy requires (it does not check)."""
    from secagg.crypto.policy import RoundPolicy

    RoundPolicy.check_job = lambda self, job, then="": None  # type: ignore[method-assign]


FAULTS = {
    "skip-policy": _skip_policy,
    "die-after-keys": _die_after_keys,
    "die-at-seal": _die_at_seal,
    "die-at-reveal": _die_at_reveal,
    "forge-key": _forge_key,
    "lie-dropout": _lie_dropout,
    "lie-small": _lie_small,
    "lie-retry": _lie_retry,
    "crash-unmasked": _crash_unmasked,
    "lie-count": _lie_count,
    "bad-key": _bad_key,
    "bad-advert": _bad_advert,
    "retry-split": _retry_split,
    "lie-split": _lie_split,
    "replay-attempt": _replay_attempt,
    "record": _record,
}

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    fault, _, argument = sys.argv[1].partition(":")
    FAULTS[fault](int(argument) if argument.isdigit() else argument)  # type: ignore[operator]
    from secagg.cli import main

    main(sys.argv[2:], prog_name="secagg")
