"""Pairwise masks inside the ciphertexts, so that no single party can read one client's update.

Every client holds the same CKKS secret key, so without masks a server that hands client A's
ciphertext to a colluding client B (or B itself, given A's ciphertext) reads A's update. Each
client ``j`` of a round therefore adds to the ``c0`` words of every ciphertext it sends (scale
histograms and update alike: the ledger and integrity tag live in the same ciphertexts) the
mask ``r_j = sum over k != j of +-PRG(s_jk)`` mod q, ``+`` when ``j < k`` (positions in the
round), ``-`` when ``j > k``. The masks of a whole round cancel mod q, so the server's sum of
``c0``'s, and what it decrypts to, is bit for bit what it is without masks, and no byte is added
to the wire. Anyone who decrypts ``c0_j`` alone gets ``Delta m_j + e + r_j``: uniform mod q
unless they know every pairwise secret of ``j``.

``s_jk`` is an X25519 agreement between ``j``'s and ``k``'s per-job keys (``publish``), each
signed with its site's ECDSA key and checked before use (``agree``), so a server that swaps a
key is caught. The PRG is HKDF-SHA256 of ``s_jk`` and the job, round, phase and the round's
*attempt nonce* (a round tried again masks afresh: two payloads under one mask would give away
their difference), giving an AES-256 key that ``seeded.expand`` turns into words exactly
uniform mod q, one polynomial per ciphertext index.

Each client also adds a *self-mask* ``PRG(b_j)`` under a key it draws afresh for each round,
attempt and phase (double masking, as in SecAgg, Bonawitz et al. 2017). After the server adds a
phase's payloads, its contributors *unmask* it in two steps: each signs the survivor set the
server names (``confirm``; one set per phase), then, given at least the round policy's
threshold of signatures of the same set by distinct survivors (``reveal``), sends its self-mask
key and, for keyed clients that sent nothing, the *correction* that removes its pairs with
them. A client the server falsely calls dropped never reveals its self-mask key, so the others'
corrections do not unmask it; a server that shows different clients different sets gathers too
few signatures for either. A client refuses to decrypt an aggregate whose contributors are not
exactly the survivors it confirmed (``check_late``), and once it revealed a key for a round it
sits out the round's later attempts (its update in two sums would give away their difference).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.crypto import neighbours, seal_format, seeded, shares
from secagg.crypto.envelope import EVALUATION, SCALES, UPDATE_PHASE, Stamp
from secagg.crypto.policy import RoundPolicy
from secagg.errors import PayloadError

#: Bytes of an X25519 public key.
PUBLIC_BYTES = 32
#: Bytes of a confirmation: an ECDSA P-256 signature as r || s.
SIGNATURE_BYTES = 64
_SIGNED_LABEL = b"secagg mask key v1\0"
_PRG_LABEL = b"secagg pairwise mask v1\0"
_CONFIRM_LABEL = b"secagg survivors v1\0"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass(frozen=True)
class Reveal:
    """What one contributor sends to unmask a phase's sum: its self-mask key for the phase
    (the server expands and subtracts it) and, when the phase lost clients, the correction
    (an envelope of ``c0`` words) that removes its pairs with them (empty otherwise)."""

    sender: int
    key: bytes
    correction: bytes = b""
    #: the sender's signature of the survivor set (the consistency round), for byte counts
    confirmation: bytes = b""
    #: its shares of the other survivors' self-mask keys for the phase, by survivor: what
    #: rebuilds the key of a survivor that vanished before revealing it
    shares: dict[int, bytes] = field(default_factory=dict)

    def __len__(self) -> int:
        held = sum(len(share) for share in self.shares.values())
        return len(self.key) + len(self.correction) + len(self.confirmation) + held


@dataclass(frozen=True)
class ShareBundle:
    """What a client hands out with its training upload: its shares of both phases' self-mask
    keys, sealed to each keyed position (relayed by the server, which cannot open them), and
    a commitment to the two keys (SHA-256 of each) that a rebuilt key is checked against."""

    sealed: dict[int, bytes]
    commitment: bytes


@dataclass(frozen=True)
class SignedKey:
    """A site's X25519 public key for one job, signed with the site's ECDSA key."""

    site: int
    public: bytes
    signature: bytes


def _signed_bytes(job: bytes, site: int, public: bytes) -> bytes:
    return _SIGNED_LABEL + job + struct.pack(">I", site) + public


class SimulatedIdentities:
    """ECDSA P-256 site keys for simulations (in-process, Ray), which have no certificates.

    Each simulated client signs with its own site's key and every client checks peers against
    the public halves, so the signature path runs and a substituted key is caught; it does not
    separate the parties: every site's key derives from one random ``root`` that the runner
    hands to every client (a Ray actor takes on several sites in turn)."""

    def __init__(self, root: bytes | None = None) -> None:
        self.root = root if root is not None else os.urandom(32)
        self._keys: dict[int, ec.EllipticCurvePrivateKey] = {}

    def __getstate__(self) -> dict[str, bytes]:
        return {"root": self.root}  # keys are not picklable; each process derives its own

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self.root, self._keys = state["root"], {}

    def signer(self, site: int) -> ec.EllipticCurvePrivateKey:
        """The site's signing key, derived from the root."""
        if site not in self._keys:
            info = b"secagg simulated site key\0" + struct.pack(">I", site)
            wide = HKDF(hashes.SHA256(), 48, salt=None, info=info).derive(self.root)
            scalar = 1 + int.from_bytes(wide, "big") % (_P256_ORDER - 1)
            self._keys[site] = ec.derive_private_key(scalar, ec.SECP256R1())
        return self._keys[site]

    def verifier(self, site: int) -> ec.EllipticCurvePublicKey:
        """The public key every peer checks the site's signatures with."""
        return self.signer(site).public_key()

    def name(self, site: int) -> str:
        """How errors call the site: as a simulation names it."""
        return f"site-{site + 1}"


class Masker:
    """One client's pairwise masks: its per-job X25519 keys, the round's agreed secrets, and
    which (round, phase) it has sent corrections for."""

    def __init__(
        self,
        signer: Callable[[int], ec.EllipticCurvePrivateKey],
        verifier: Callable[[int], ec.EllipticCurvePublicKey],
        name: Callable[[int], str] = lambda site: f"site {site}",
        policy: RoundPolicy | None = None,
    ) -> None:
        self._signer = signer
        self._verifier = verifier
        #: what this client enforces whatever the server claims (``crypto.policy``); None:
        #: only that a round hands keys to at least one other site
        self.policy = policy
        #: how errors name a site (a deployment's site names, from its kit's roster)
        self._name = name
        self._private: dict[tuple[bytes, int], X25519PrivateKey] = {}
        #: (job, round) -> (own position, {peer position: pair secret})
        self._round: tuple[tuple[bytes, int], int, dict[int, bytes]] | None = None
        #: the agreed round's attempt nonce (fresh masks for a round tried again)
        self._nonce = b""
        #: (job, round, nonce, phase) -> the survivor set this client confirmed (signed)
        self._confirmed: dict[tuple[bytes, int, bytes, int], tuple[int, ...]] = {}
        #: (job, round, nonce, phase) -> this client's signature of the set it confirmed
        self._signatures: dict[tuple[bytes, int, bytes, int], bytes] = {}
        #: (job, round, nonce, phase) -> the survivors it revealed its self-mask key for
        self._corrected: dict[tuple[bytes, int, bytes, int], tuple[int, ...]] = {}
        #: (job, round) -> the attempt in which this client sent its masked update: its update
        #: of that round is never sent again (another attempt could difference it)
        self._released: dict[tuple[bytes, int], bytes] = {}
        #: (job, round) -> the attempt and survivor set this client unmasked the round's scale
        #: exchange for: another attempt's is unmasked only over the same sites
        self._scales_unmasked: dict[tuple[bytes, int], tuple[bytes, tuple[int, ...]]] = {}
        #: (job, round, nonce, phase) -> this client's fresh self-mask key
        self._self_keys: dict[tuple[bytes, int, bytes, int], bytes] = {}
        #: (job, round, nonce) -> the shares this client handed out for that attempt
        self._bundles: dict[tuple[bytes, int, bytes], ShareBundle] = {}
        #: (job, round, nonce) -> sender -> its shares of its (scales, update) keys for this
        #: client, opened
        self._held: dict[tuple[bytes, int, bytes], dict[int, tuple[bytes, bytes]]] = {}
        #: the round's positions -> the site at each (whose key signs its confirmations)
        self._sites: dict[int, int] = {}
        #: the agreed round's roster (an evaluation by more sites than it keyed is unmasked)
        self._roster = 0
        #: in a neighbour-graph round, this client's own picks among the keyed positions (None:
        #: the full graph, where every keyed position holds a share and confirms for it)
        self._picks: frozenset[int] | None = None
        self._masked: set[tuple[bytes, int, bytes, int]] = set()
        #: (job, own public key, a checked peer key) -> the pair's secret
        self._secrets: dict[tuple[bytes, bytes, SignedKey], bytes] = {}

    def __getstate__(self) -> dict[str, object]:
        """Its state, the X25519 keys as their raw bytes (what ``secagg.flower`` keeps on a
        node between messages)."""
        private = {key: value.private_bytes_raw() for key, value in self._private.items()}
        return {**self.__dict__, "_private": private}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        raw: dict[tuple[bytes, int], bytes] = state["_private"]  # type: ignore[assignment]
        self._private = {k: X25519PrivateKey.from_private_bytes(v) for k, v in raw.items()}

    def publish(self, job: bytes, site: int) -> SignedKey:
        """This client's signed X25519 public key for ``job`` as ``site`` (made on first use)."""
        public = _raw(self._private.setdefault((job, site), X25519PrivateKey.generate()))
        signature = self._signer(site).sign(
            _signed_bytes(job, site, public), ec.ECDSA(hashes.SHA256())
        )
        return SignedKey(site, public, signature)

    def agree(self, stamp: Stamp, peers: Sequence[SignedKey | None], nonce: bytes = b"") -> None:
        """Check every peer's signature and agree a secret with each; ``peers[p]`` is the key
        of the round's position ``p`` (None: a position that takes no part in the round),
        ``stamp.sender`` this client's position. ``nonce`` names the round's attempt: every
        client of an attempt is given the same one, and a new attempt a new one."""
        if len(peers) != stamp.roster:
            raise PayloadError(
                f"the round has {stamp.roster} clients but {len(peers)} mask keys were relayed",
                "bad-plan",
            )
        released = self._released.get((stamp.job, stamp.round_num))
        if released is not None and released != nonce:
            raise PayloadError(
                f"this site already revealed its masks for round {stamp.round_num} in an earlier "
                "attempt; it sits the round out (the same update in two sums would give away "
                "their difference)",
                "sit-out",
            )
        keyed = sum(peer is not None for peer in peers)
        if self.policy is not None:
            self.policy.check_roster(keyed)
        elif keyed < 2:
            raise PayloadError("a masked round needs at least two keyed sites", "policy")
        own = peers[stamp.sender]
        private = None if own is None else self._private.get((stamp.job, own.site))
        if own is None or private is None or _raw(private) != own.public:
            who = "no key" if own is None else f"{self._name(own.site)}'s key"
            raise PayloadError(
                f"the mask key relayed for this client is not its own ({who} was relayed at its "
                "position): it was substituted on the way",
                "bad-key",
            )
        chosen, around = self._neighbours(stamp, peers)
        secrets: dict[int, bytes] = {}
        for position, peer in enumerate(peers):
            if position == stamp.sender or peer is None or position not in around:
                continue
            # Keys are per job: a peer met in an earlier round was checked then.
            known = (stamp.job, own.public, peer)
            if known not in self._secrets:
                verify(stamp.job, peer, self._verifier(peer.site), self._name(peer.site))
                shared = private.exchange(X25519PublicKey.from_public_bytes(peer.public))
                low, high = sorted((own.public, peer.public))
                self._secrets[known] = shared + low + high
            secrets[position] = self._secrets[known]
        self._round = ((stamp.job, stamp.round_num), stamp.sender, secrets)
        self._picks = chosen
        self._sites = {p: peer.site for p, peer in enumerate(peers) if peer is not None}
        self._roster = stamp.roster
        self._nonce = nonce
        for key in [k for k in self._self_keys if k[:2] != (stamp.job, stamp.round_num)]:
            del self._self_keys[key]
        for table in (self._held, self._bundles):
            for old in [k for k in table if k[:2] != (stamp.job, stamp.round_num)]:
                del table[old]

    def _neighbours(
        self, stamp: Stamp, peers: Sequence[SignedKey | None]
    ) -> tuple[frozenset[int] | None, frozenset[int]]:
        """This client's picks (None in a full-graph round) and every position it masks
        with; a graph round in which fewer than ``pick_threshold`` of its picks were keyed is
        sat out (its shares could not rebuild its keys, and it would reveal nothing)."""
        everyone = frozenset(p for p, peer in enumerate(peers) if peer is not None)
        if self.policy is None or not self.policy.graph(stamp.roster):
            return None, everyone - {stamp.sender}
        keys = [None if peer is None else (peer.site, peer.public) for peer in peers]
        chosen, around = neighbours.graph(stamp.job, keys, stamp.sender, self.policy.picks)
        if len(chosen) < self.policy.pick_threshold:
            raise PayloadError(
                f"only {len(chosen)} of the {self.policy.picks} sites this site masks with in "
                f"round {stamp.round_num} were handed keys, fewer than the round policy's "
                f"{self.policy.pick_threshold}: it sits the round out",
                "sit-out",
            )
        return chosen, around

    def keyed(self) -> set[int]:
        """The positions of the agreed round that were handed keys."""
        return set(self._sites)

    def active(self, stamp: Stamp) -> bool:
        """Whether this client masks ``stamp``'s payload: it agreed masks for the round (an
        evaluation is masked when the round's positions evaluate it; a simulation's extra
        evaluator, which holds no keys of the round, makes it unmasked)."""
        agreed = self._round is not None and self._round[0] == (stamp.job, stamp.round_num)
        return agreed and (stamp.phase != EVALUATION or stamp.roster == self._roster)

    def plan(self, stamp: Stamp) -> MaskPlan:
        """What this client's mask for ``stamp``'s phase is made of (its PRG keys), so that it
        can be expanded ahead of time (``MaskPlan.words``); it marks nothing as used."""
        return self._plan(stamp, None, negate=False)

    def mask(
        self,
        stamp: Stamp,
        count: int,
        n: int,
        modulus: int,
        prepared: tuple[MaskPlan, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``(count, n)`` words: this client's mask for the phase's ciphertexts ``0..count-1``;
        once per (round, phase): a second payload under the same mask would give away the
        difference of the two to any key holder (a retried round stops here, by name).
        ``prepared``: a plan and the words it expanded to ahead of time, used when the plan is
        still this phase's."""
        key = self._phase_key(stamp)
        if key in self._masked:
            raise PayloadError(
                f"this client already sent a masked payload for round {stamp.round_num}'s "
                "phase; masking another under the same masks would reveal their difference",
                "mask-reused",
            )
        plan = self._plan(stamp, None, negate=False)
        self._masked.add(key)
        if stamp.phase == UPDATE_PHASE:
            # The update leaves now, under this attempt's masks, and its key may be rebuilt
            # from shares without this client: it is never sent in another attempt of the
            # round (the difference of two sums would give it away).
            self._released[(stamp.job, stamp.round_num)] = self._nonce
        if prepared is not None and prepared[0] == plan and prepared[1].shape == (count, n):
            return prepared[1]
        return plan.words(count, n, modulus)

    def share(self, stamp: Stamp) -> ShareBundle:
        """This client's threshold shares of both phases' self-mask keys of the agreed round,
        one per keyed position, each sealed to its recipient (``crypto.shares``)."""
        if self._round is None or not self.active(stamp):
            raise PayloadError(f"no mask keys were agreed for round {stamp.round_num}", "bad-plan")
        made = self._bundles.get(context_key(stamp, self._nonce))
        if made is not None:  # one sealing per attempt and pair: GCM's nonce is fixed
            return made
        _, own, secrets = self._round
        keys = [self._self_key(stamp.at(phase)) for phase in (SCALES, UPDATE_PHASE)]
        positions, threshold = self._holders()
        scales, update = (shares.split(key, positions, threshold) for key in keys)
        context = self._share_context(stamp)
        sealed = {
            p: shares.seal(secrets[p], context, own, p, scales[p] + update[p])
            for p in positions
            if p != own
        }
        if own in positions:
            held = self._held.setdefault(context_key(stamp, self._nonce), {})
            held[own] = (scales[own], update[own])
        commitment = b"".join(hashlib.sha256(key).digest() for key in keys)
        bundle = self._bundles[context_key(stamp, self._nonce)] = ShareBundle(sealed, commitment)
        return bundle

    def _holders(self) -> tuple[list[int], int]:
        """The positions this client's key shares go to, and how many rebuild a key: every
        keyed position, ``threshold`` of them; in a graph round its picks,
        ``pick_threshold`` of them."""
        if self._picks is not None and self.policy is not None:
            return sorted(self._picks), self.policy.pick_threshold
        positions = sorted(self._sites)
        threshold = self.policy.threshold if self.policy is not None else len(positions)
        return positions, min(threshold, len(positions))

    def take(self, stamp: Stamp, sealed: dict[int, bytes]) -> None:
        """Open the shares the round's other clients sealed to this one (``sealed``: sender
        -> bytes); one that does not open is left out (the others rebuild without it)."""
        if self._round is None or not self.active(stamp):
            return
        _, own, secrets = self._round
        held = self._held.setdefault(context_key(stamp, self._nonce), {})
        context = self._share_context(stamp)
        for sender, blob in sealed.items():
            if sender in held or sender not in secrets:
                continue
            try:
                opened = shares.open_sealed(secrets[sender], context, sender, own, blob)
            except PayloadError:
                continue
            if len(opened) == 2 * shares.SHARE_BYTES:
                held[sender] = (opened[: shares.SHARE_BYTES], opened[shares.SHARE_BYTES :])

    def _share_context(self, stamp: Stamp) -> bytes:
        return stamp.job + struct.pack(">I", stamp.round_num) + self._nonce

    def confirm(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        """Sign the survivor set the server says ``stamp``'s phase added (the consistency
        round); refused (PayloadError) when it breaks the policy, leaves this client out, or
        differs from a set this client already signed for the phase."""
        key = self._check_survivors(stamp, survivors)
        earlier = self._confirmed.get(key)
        if earlier is not None and earlier != survivors:
            raise PayloadError(
                f"the server showed this site two survivor sets for round {stamp.round_num}'s "
                f"{_phase(stamp)}: {_names(earlier, self._site_name)} and then "
                f"{_names(survivors, self._site_name)}; it signs only one",
                "inconsistent",
            )
        self._confirmed[key] = survivors
        der = self._signer(self._sites[stamp.sender]).sign(
            self._confirmation(stamp, survivors), ec.ECDSA(hashes.SHA256())
        )
        # r || s, 32 bytes each: a fixed length (DER's varies), so rounds count equal bytes
        signature = b"".join(n.to_bytes(32, "big") for n in decode_dss_signature(der))
        self._signatures[key] = signature
        return signature

    def reveal(
        self,
        stamp: Stamp,
        survivors: tuple[int, ...],
        confirmations: dict[int, bytes],
        count: int,
        n: int,
        modulus: int,
    ) -> tuple[bytes, np.ndarray | None, dict[int, bytes]]:
        """This client's self-mask key for ``stamp``'s phase, the ``(count, n)`` words that
        remove its pairs with the round's keyed clients outside ``survivors`` (None when
        there are none), and its shares of the other survivors' keys for the phase. Only for
        the set this client confirmed, once per phase, and only when at least ``threshold``
        distinct survivors confirmed the same set: a server that showed sites different sets
        gets nothing."""
        key = self._check_survivors(stamp, survivors)
        if self._confirmed.get(key) != survivors:
            raise PayloadError(
                f"the server asks this site to unmask round {stamp.round_num}'s "
                f"{_phase(stamp)} for {_names(survivors, self._site_name)}, a survivor set it "
                "did not confirm",
                "inconsistent",
            )
        if key in self._corrected:
            raise PayloadError(
                f"this site already unmasked round {stamp.round_num}'s {_phase(stamp)}; it "
                "does so once",
                "bad-plan",
            )
        self._check_confirmations(stamp, survivors, confirmations)
        if stamp.phase == SCALES:
            self._check_scales_retry(stamp, survivors)
        self._corrected[key] = survivors
        # A correction names every keyed position that sent nothing (what the server checks)
        # and removes this client's pairs with those among its neighbours.
        dropped = set(self._sites) - set(survivors)
        assert self._round is not None  # the phase is active (``_check_survivors``)
        lost = tuple(sorted(dropped & set(self._round[2])))
        words = self._pairs(stamp, lost, count, n, modulus, negate=True) if dropped else None
        return self._self_key(stamp), words, self._shares_of(stamp, survivors)

    def _check_scales_retry(self, stamp: Stamp, survivors: tuple[int, ...]) -> None:
        """Unmask a round's scale exchange in a later attempt only over the sites it was
        unmasked over before: training is seeded, so two sums over sets that differ by one
        site would give that site's histogram, count and training metrics away. (Every
        honest survivor refuses, so the others cannot rebuild its key from shares.)"""
        round_key = (stamp.job, stamp.round_num)
        earlier = self._scales_unmasked.get(round_key)
        if earlier is not None and earlier[0] != self._nonce and earlier[1] != survivors:
            raise PayloadError(
                f"this site unmasked round {stamp.round_num}'s scale exchange over "
                f"{_names(earlier[1], self._site_name)} in an earlier attempt; it does so again "
                "only over the same sites (two sums over different sites would give a site's "
                "count and metrics away), and sits this attempt out",
                "sit-out",
            )
        self._scales_unmasked[round_key] = (self._nonce, survivors)

    def _shares_of(self, stamp: Stamp, survivors: tuple[int, ...]) -> dict[int, bytes]:
        """This client's shares of the other survivors' self-mask keys for the phase: only of
        survivors (a client outside the set gets corrections instead, never both)."""
        if stamp.phase == EVALUATION:  # its keys are not shared: a lost survivor loses it
            return {}
        held = self._held.get(context_key(stamp, self._nonce), {})
        index = _slot(stamp.phase)
        return {u: held[u][index] for u in survivors if u != stamp.sender and u in held}

    def signature(self, stamp: Stamp) -> bytes:
        """This client's confirmation of ``stamp``'s phase (empty if it confirmed none)."""
        return self._signatures.get(self._phase_key(stamp), b"")

    def check_late(self, stamp: Stamp, contributors: tuple[int, ...]) -> None:
        """Refuse an aggregate of fewer contributors than the policy allows; and, for a phase
        of an attempt in which this client sent a masked payload, one that does not add
        exactly the survivors it confirmed and unmasked for (a late update is never added,
        and no sum is unmasked behind its back). ``stamp.attempt`` names the attempt the
        aggregate belongs to, which its contributions' tags are checked against."""
        if self.policy is not None:
            self.policy.check_sum(len(contributors), "the aggregate adds")
        key = (stamp.job, stamp.round_num, stamp.attempt, stamp.phase)
        survivors = self._corrected.get(key)
        if survivors is None and key in self._masked:
            raise PayloadError(
                f"the aggregate of round {stamp.round_num}'s {_phase(stamp)} was unmasked "
                "without this site, which sent a masked payload for it and confirmed no "
                "survivor set: it is not decrypted",
                "late-update",
            )
        if survivors is not None and tuple(contributors) != survivors:
            late = sorted(set(contributors) - set(survivors))
            what = (
                f"adds client(s) {late} after the round corrected for their dropout: "
                if late
                else "does not add the survivors this site confirmed: "
            )
            raise PayloadError(
                f"the aggregate {what}a sum other than the confirmed one is never decrypted",
                "late-update",
            )

    def _check_survivors(
        self, stamp: Stamp, survivors: tuple[int, ...]
    ) -> tuple[bytes, int, bytes, int]:
        """Refuse a survivor set that is not a sorted subset of the round's keyed sites with
        this client in it and at least ``threshold`` members; return the phase's key."""
        if not self.active(stamp):
            raise PayloadError(f"no mask keys were agreed for round {stamp.round_num}", "bad-plan")
        if list(survivors) != sorted(set(survivors)) or not set(survivors) <= set(self._sites):
            raise PayloadError(
                f"the survivor set {list(survivors)} is not a sorted subset of the round's "
                "keyed sites",
                "bad-plan",
            )
        if stamp.sender not in survivors:
            raise PayloadError(
                "no corrections for a client that did not contribute: the survivor set "
                "leaves this site out",
                "bad-plan",
            )
        if self.policy is not None:
            self.policy.check_sum(len(survivors), f"the server says the {_phase(stamp)} added")
        return self._phase_key(stamp)

    def _phase_key(self, stamp: Stamp) -> tuple[bytes, int, bytes, int]:
        """``stamp``'s phase of the agreed attempt: what this client's per-phase state is
        kept by (its masks, self-mask keys, confirmations and reveals)."""
        return (stamp.job, stamp.round_num, self._nonce, stamp.phase)

    def _check_confirmations(
        self, stamp: Stamp, survivors: tuple[int, ...], confirmations: dict[int, bytes]
    ) -> None:
        """At least ``threshold`` (all survivors without a policy) valid signatures of this
        survivor set by distinct survivors, or PayloadError naming the sites whose
        confirmation did not verify."""
        message = self._confirmation(stamp, survivors)
        checked, needed = self._confirmers(stamp, survivors)
        valid, bad = 0, []
        for position, signature in sorted(confirmations.items()):
            if position not in checked:
                continue
            try:
                if len(signature) != SIGNATURE_BYTES:
                    raise ValueError("not a P-256 signature")
                der = encode_dss_signature(
                    int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                )
                self._verifier(self._sites[position]).verify(
                    der, message, ec.ECDSA(hashes.SHA256())
                )
                valid += 1
            except (InvalidSignature, ValueError, TypeError):
                bad.append(position)
        if valid < needed:
            why = (
                f"; {_names(tuple(bad), self._site_name)} signed another set (the server showed "
                "sites different survivor sets) or their confirmation was altered"
                if bad
                else ""
            )
            raise PayloadError(
                f"only {valid} of the {needed} confirmations needed of the survivor set "
                f"{_names(survivors, self._site_name)} for round {stamp.round_num}'s "
                f"{_phase(stamp)} verify{why}: this site reveals nothing",
                "inconsistent",
            )

    def _confirmers(self, stamp: Stamp, survivors: tuple[int, ...]) -> tuple[set[int], int]:
        """Whose confirmations of ``survivors`` this client checks, and how many must verify:
        any survivor's, ``threshold`` of them; in a graph round its picks', and
        ``pick_threshold`` of them, all of whom must be survivors (its update is safe while
        one honest pick's pair mask stays on it)."""
        if self._picks is None or self.policy is None:
            needed = self.policy.threshold if self.policy is not None else len(survivors)
            return set(survivors), needed
        present = self._picks & set(survivors)
        needed = self.policy.pick_threshold
        if len(present) < needed:
            raise PayloadError(
                f"only {len(present)} of the sites this site masks with in round "
                f"{stamp.round_num} are in the survivor set of its {_phase(stamp)}, fewer than "
                f"the round policy's {needed}: this site reveals nothing for it",
                "neighbours",
            )
        return set(present), needed

    def _confirmation(self, stamp: Stamp, survivors: tuple[int, ...]) -> bytes:
        return (
            _CONFIRM_LABEL
            + stamp.job
            + struct.pack(">IBIB", stamp.round_num, stamp.phase, len(survivors), len(self._nonce))
            + self._nonce
            + struct.pack(f">{len(survivors)}I", *survivors)
        )

    def _site_name(self, position: int) -> str:
        return self._name(self._sites.get(position, position))

    def _self_key(self, stamp: Stamp) -> bytes:
        """This client's self-mask key for ``stamp``'s phase of the agreed attempt, fresh."""
        key = self._phase_key(stamp)
        return self._self_keys.setdefault(key, os.urandom(seeded.SEED_BYTES))

    def _pairs(
        self,
        stamp: Stamp,
        only: tuple[int, ...] | None,
        count: int,
        n: int,
        modulus: int,
        *,
        negate: bool,
    ) -> np.ndarray:
        return self._plan(stamp, only, negate=negate).words(count, n, modulus)

    def _plan(self, stamp: Stamp, only: tuple[int, ...] | None, *, negate: bool) -> MaskPlan:
        if self._round is None or not self.active(stamp):
            raise PayloadError(f"no mask keys were agreed for round {stamp.round_num}", "bad-plan")
        _, own, secrets = self._round
        chosen = sorted(secrets) if only is None else only
        if any(position not in secrets for position in chosen):
            raise PayloadError(f"clients {list(chosen)} are not all in the round", "bad-plan")
        keys = [_prg_key(secrets[position], stamp, self._nonce) for position in chosen]
        # A pair's words are added by the lower position and subtracted by the higher (and the
        # other way round in a correction).
        adds = [(own < position) != negate for position in chosen]
        plus = tuple(k for k, a in zip(keys, adds, strict=True) if a)
        minus = tuple(k for k, a in zip(keys, adds, strict=True) if not a)
        if only is None:  # the mask itself: the pairs and this client's self-mask
            plus += (self._self_key(stamp),)
        return MaskPlan(plus, minus)


@dataclass(frozen=True)
class MaskPlan:
    """The PRG keys of one client's mask in one phase: words it adds and words it subtracts.
    A pure value: expanding it (``words``) needs no state, so it can run in the background."""

    plus: tuple[bytes, ...]
    minus: tuple[bytes, ...]

    def words(self, count: int, n: int, modulus: int) -> np.ndarray:
        """``(count, n)`` words mod q: each side summed lazily, subtracted once."""
        out = seeded.expand_sum(self.plus, 0, count, n, modulus)
        minus = seeded.expand_sum(self.minus, 0, count, n, modulus)
        np.subtract(np.uint64(modulus), minus, out=minus)  # in (0, q]: adds right mod q
        seal_format.add_mod(out, minus, modulus)
        return out


def verify(
    job: bytes, signed: SignedKey, public: ec.EllipticCurvePublicKey, name: str | None = None
) -> None:
    """Refuse (``bad-key``) a mask key not signed by its site for this job; errors call the
    site ``name`` (default ``site N``)."""
    name = name or f"site {signed.site}"
    if len(signed.public) != PUBLIC_BYTES:
        raise PayloadError(f"{name}'s mask key is not {PUBLIC_BYTES} bytes", "bad-key")
    try:
        public.verify(
            signed.signature,
            _signed_bytes(job, signed.site, signed.public),
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature as err:
        raise PayloadError(
            f"{name}'s mask key is not signed by its site key: it was substituted "
            "on the way (the server or the network); this client will not use it",
            "bad-key",
        ) from err


def context_key(stamp: Stamp, nonce: bytes) -> tuple[bytes, int, bytes]:
    """A round's attempt: what the shares a client holds belong to."""
    return (stamp.job, stamp.round_num, nonce)


def rebuild(sender: int, reveals: Sequence[Reveal], commitment: bytes, phase: int) -> bytes:
    """The self-mask key of ``sender`` (which revealed nothing) from the shares the other
    survivors revealed, checked against the commitment it made when it trained (PayloadError
    ``missing-correction`` naming it when they do not rebuild it)."""
    held = {r.sender: r.shares[sender] for r in reveals if sender in r.shares}
    try:
        key = shares.combine(held, seeded.SEED_BYTES)
    except PayloadError:
        key = b""
    if not held or not committed(key, commitment, phase):
        raise PayloadError(
            f"client {sender} sent no mask reveal (or not the key it committed to), and the "
            f"{len(held)} share(s) of its key the others revealed do not rebuild it: the sum "
            "cannot be unmasked",
            "missing-correction",
        )
    return key


def committed(key: bytes, commitment: bytes, phase: int) -> bool:
    """Whether ``key`` is the one a client committed to for ``phase`` when it trained."""
    index = _slot(phase)
    return hashlib.sha256(key).digest() == commitment[32 * index : 32 * index + 32]


def _slot(phase: int) -> int:
    """Where a phase's key sits in a client's shares and commitment: scales first (the
    evaluation's key is neither shared nor committed to)."""
    if phase == EVALUATION:
        raise PayloadError("an evaluation's self-mask key has no shares", "bad-plan")
    return 0 if phase == SCALES else 1


def self_masks(keys: Sequence[bytes], count: int, n: int, modulus: int) -> np.ndarray:
    """``(count, n)`` words that remove the revealed self-masks ``keys`` from a sum."""
    return MaskPlan((), tuple(keys)).words(count, n, modulus)


def _phase(stamp: Stamp) -> str:
    return {SCALES: "scale exchange", EVALUATION: "evaluation"}.get(stamp.phase, "update")


def _names(positions: tuple[int, ...], name: Callable[[int], str]) -> str:
    return "[" + ", ".join(name(p) for p in positions) + "]"


def _raw(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _prg_key(secret: bytes, stamp: Stamp, nonce: bytes) -> bytes:
    info = _PRG_LABEL + stamp.job + struct.pack(">IB", stamp.round_num, stamp.phase) + nonce
    return HKDF(hashes.SHA256(), seeded.SEED_BYTES, salt=None, info=info).derive(secret)
