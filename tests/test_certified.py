"""Mask keys signed with the sites' certificate keys (``secagg.crypto.certified``), and the
network server's round state for masked rounds (``transport.coordinator``), without processes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import round_of
from cryptography.hazmat.primitives.asymmetric import ec

from secagg.crypto.certified import CertifiedIdentities
from secagg.crypto.masking import Masker, SignedKey
from secagg.errors import PayloadError
from secagg.provision import Kit, _ca_certificate, _leaf_certificate, _pem_cert, load_kit, provision

SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return provision(tmp_path_factory.mktemp("project"), "localhost:9000", SITES)


def _site(kits: dict[str, Path], name: str) -> tuple[Kit, CertifiedIdentities, Masker]:
    kit = load_kit(kits[name], "client")
    identities = CertifiedIdentities(kit.roster, kit.index, kit.private_key, kit.ca)
    return kit, identities, Masker(identities.signer, identities.verifier, identities.name)


def _agree(kits: dict[str, Path], relayed: dict[int, tuple[SignedKey, bytes]]) -> None:
    """site-1 checks the relayed certificates and agrees masks with the relayed keys."""
    _, identities, masker = _site(kits, "site-1")
    stamp = round_of(1, roster=3)
    own = masker.publish(stamp.job, 0)
    for site, (_, certificate) in relayed.items():
        identities.learn(site, certificate)
    masker.advertise(stamp.for_sender(0), [own, relayed[1][0], relayed[2][0]], b"")


def _genuine(kits: dict[str, Path]) -> dict[int, tuple[SignedKey, bytes]]:
    keys = {}
    for index in (1, 2):
        kit, _, masker = _site(kits, SITES[index])
        keys[index] = (masker.publish(round_of(1, roster=3).job, index), kit.certificate)
    return keys


def test_keys_signed_with_site_certificates_agree(kits: dict[str, Path]) -> None:
    _agree(kits, _genuine(kits))


def test_a_swapped_key_is_caught_by_its_signature(kits: dict[str, Path]) -> None:
    relayed = _genuine(kits)
    key, certificate = relayed[2]
    relayed[2] = (replace(key, public=bytes(32)), certificate)
    with pytest.raises(PayloadError, match="site-3's mask key is not signed by its site key"):
        _agree(kits, relayed)


def test_a_certificate_of_another_ca_is_caught_though_its_signature_verifies(
    kits: dict[str, Path],
) -> None:
    """A server that makes its own CA and a site-2 certificate under it, and signs a key of
    its own with that certificate's key: the key verifies, the certificate does not."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _ca_certificate(ca_key, "secagg")
    forged = _pem_cert(_leaf_certificate(key, ca_key, ca, "site-2", "client", "secagg", "x"))
    mallory = Masker(lambda site: key, lambda site: key.public_key())
    relayed = _genuine(kits)
    relayed[1] = (mallory.publish(round_of(1, roster=3).job, 1), forged)
    with pytest.raises(PayloadError, match="site-2's relayed certificate is not signed by this"):
        _agree(kits, relayed)


@pytest.mark.parametrize("impostor", ["site-3", "server", "admin"])
def test_another_partys_certificate_is_caught_by_name(kits: dict[str, Path], impostor: str) -> None:
    """A certificate the project's CA did sign, of another site or of the server, relayed in
    site-2's place (with a key that party signed)."""
    relayed = _genuine(kits)
    certificate = kits[impostor] / f"{'client' if impostor == 'site-3' else impostor}.pem"
    relayed[1] = (relayed[1][0], certificate.read_bytes())
    with pytest.raises(PayloadError, match=f"site-2's relayed certificate names '{impostor}'"):
        _agree(kits, relayed)


def test_a_site_signs_for_itself_only_and_needs_a_relayed_certificate(
    kits: dict[str, Path],
) -> None:
    _, identities, _ = _site(kits, "site-1")
    with pytest.raises(PayloadError, match="this site is site-1; it cannot sign for site-2"):
        identities.signer(1)
    with pytest.raises(PayloadError, match="no certificate was relayed with site-3's mask key"):
        identities.verifier(2)
    with pytest.raises(PayloadError, match="site-2's relayed certificate is not a certificate"):
        identities.learn(1, b"-----BEGIN CERTIFICATE-----\nnot one\n")


# --- the network server's round state ---------------------------------------------------------


def _coordinator(kits: dict[str, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    from secagg.crypto.plain import PlainCipher
    from secagg.messages import ModelSignature
    from secagg.transport.coordinator import Coordinator

    kit = load_kit(kits["server"], "server")
    config = {"he": True, "masking": True}
    coordinator = Coordinator(kit, PlainCipher(), config, bytes(16), tmp_path, 0, 60.0, 1000)
    coordinator.expect(ModelSignature([("w", (4,), "float32")], "d"), 4)  # the job's model
    return coordinator


def test_the_server_takes_only_each_sites_own_mask_key(kits: dict[str, Path], tmp_path) -> None:  # type: ignore[no-untyped-def]
    from secagg.messages import ModelSignature
    from secagg.transport.grpc_wire import Hello, MaskKey

    coordinator = _coordinator(kits, tmp_path)
    model = ModelSignature([("w", (4,), "float32")], "d")
    site = coordinator.sites[1]
    with pytest.raises(PayloadError, match="site-2 sent no mask key, and this job masks"):
        coordinator.join(site, Hello(model=model))
    with pytest.raises(PayloadError, match="site-2 is site 1 of the roster, not 2"):
        coordinator.join(site, Hello(model=model, mask=MaskKey(2, bytes(32), bytes(70), b"-")))
    assert not site.joined


def test_a_late_upload_is_refused_once_its_phase_was_unmasked(
    kits: dict[str, Path], tmp_path: Path
) -> None:
    """site-3's update arrives after the round closed the update phase for its dropout: refused
    by round state (``late-update``), while the reveals are taken."""
    from secagg.crypto.envelope import UPDATE_PHASE
    from secagg.messages import ModelSignature
    from secagg.transport.grpc_wire import Hello, UploadHeader

    coordinator = _coordinator(kits, tmp_path)
    model = ModelSignature([("w", (4,), "float32")], "d")
    for site in coordinator.sites:
        coordinator.join(site, Hello(model=model, mask=_signed_key(kits, site.name)))
    assert [k and k["site"] for k in coordinator.mask_keys(frozenset({0, 2}))] == [0, None, 2]
    everyone = frozenset({0, 1, 2})
    seal = coordinator.post("seal", 1, everyone, total_samples=30)
    coordinator.close(seal, (2,))
    correct = coordinator.post("correct", 1, frozenset({0, 1}), phase="update")
    late = coordinator.sites[2]
    with pytest.raises(PayloadError, match="site-3's upload is late") as caught:
        coordinator.check_upload(late, UploadHeader(seal.id))
    assert caught.value.reason == "late-update"
    with pytest.raises(PayloadError, match="not asked for this round"):
        coordinator.check_upload(late, UploadHeader(correct.id))
    revealing = UploadHeader(correct.id, revealed=bytes(32))
    task, stamp, values = coordinator.check_upload(coordinator.sites[0], revealing)
    assert (task, stamp.sender, stamp.phase, values) == (correct, 0, UPDATE_PHASE, 0)


def _signed_key(kits: dict[str, Path], name: str, job: bytes = bytes(16)):  # type: ignore[no-untyped-def]
    from secagg.transport.grpc_wire import MaskKey

    kit, _, masker = _site(kits, name)
    key = masker.publish(job, kit.index)
    return MaskKey(kit.index, key.public, key.signature, kit.certificate)


def test_a_site_joining_with_a_badly_signed_mask_key_is_left_out_at_the_door(
    kits: dict[str, Path], tmp_path: Path
) -> None:
    """One insider's bad key never reaches the honest sites (where it would stop them): the
    server checks each joining key against the site's CA-signed certificate and refuses it,
    naming the site; the others join."""
    from dataclasses import replace

    from secagg.messages import ModelSignature
    from secagg.transport.grpc_wire import Hello

    coordinator = _coordinator(kits, tmp_path)
    model = ModelSignature([("w", (4,), "float32")], "d")
    good = _signed_key(kits, "site-2")
    bad = replace(good, signature=bytes(len(good.signature)))
    other_job = _signed_key(kits, "site-2", job=b"x" * 16)
    foreign = replace(good, certificate=load_kit(kits["site-1"], "client").certificate)
    for key, why in (
        (bad, "not signed by its site key"),
        (other_job, "not signed by its site key"),
        (foreign, "names 'site-1'"),
    ):
        with pytest.raises(PayloadError, match=f"site-2's mask key is refused.*{why}") as caught:
            coordinator.join(coordinator.sites[1], Hello(model=model, mask=key))
        assert caught.value.reason == "no-mask-key"
    assert not coordinator.sites[1].joined
    coordinator.join(coordinator.sites[1], Hello(model=model, mask=good))
    assert coordinator.sites[1].joined


def test_a_site_claiming_more_test_samples_than_the_bound_is_refused(
    kits: dict[str, Path], tmp_path: Path
) -> None:
    """The round's metrics are weighted by test counts: a site that claims 2**61 test samples
    at accuracy 1.0 would set them. Its report is refused, naming it, like a training count
    over max_client_samples (1000 here)."""
    from secagg.messages import EvalReply, Seconds
    from secagg.transport.grpc_wire import Report

    coordinator = _coordinator(kits, tmp_path)
    task = coordinator.post("apply", 1, frozenset({0, 1, 2}))
    lying = EvalReply(1, 0.0, 2**61, {"accuracy": 1.0})
    report = Report(task.id, 1, Seconds(), 0, 1.0, (0, 1, 2), lying)
    with pytest.raises(PayloadError, match="site-2 reports 2305843009213693952 test samples"):
        coordinator.report(coordinator.sites[1], report)
    assert 1 not in coordinator.reports
    honest = Report(task.id, 1, Seconds(), 0, 1.0, (0, 1, 2), EvalReply(1, 0.5, 900, {}))
    coordinator.report(coordinator.sites[1], honest)
    assert coordinator.reports[1] == honest


def test_the_round_policy_in_a_kit_is_the_cas(kits: dict[str, Path], tmp_path: Path) -> None:
    """Every kit holds the round policy signed by the project's CA: a site reads it back, and
    refuses one that was changed (a lower threshold, say) or is missing, saying what to do."""
    import shutil

    from secagg.crypto.policy import POLICY_FILE, RoundPolicy, default_threshold
    from secagg.errors import ConfigError

    kit = load_kit(kits["site-1"], "client")
    assert kit.policy() == RoundPolicy(default_threshold(len(SITES)), len(SITES))
    # What provision reports: colluders c with c <= t - 2 and 2t - n > c.
    assert [default_threshold(n) for n in (2, 3, 4, 8, 100)] == [2, 3, 3, 6, 67]
    assert [RoundPolicy(t, n).tolerated() for t, n in ((2, 3), (3, 3), (6, 8), (67, 100))] == [
        0,
        1,
        3,
        33,
    ]
    assert load_kit(kits["server"], "server").policy() == kit.policy()
    copy = tmp_path / "site-1"
    shutil.copytree(kits["site-1"], copy)
    (copy / POLICY_FILE).write_bytes(RoundPolicy(1, len(SITES)).to_bytes())
    with pytest.raises(ConfigError, match="is not signed by this project's CA: it was altered"):
        load_kit(copy, "client").policy()
    (copy / POLICY_FILE).unlink()
    with pytest.raises(ConfigError, match="make the kits again"):
        load_kit(copy, "client").policy()
