"""secagg's HE in Flower's deployment engine: a SuperLink with TLS and SuperNode authentication,
three SuperNodes, each a process of its own on loopback, and ``flwr run``.

Flower 1.42 starts a ClientApp process for every message, and a secagg round is about eight
messages: one round takes about three minutes on a 2-core machine, beyond the suite's budget.
So this test runs when asked: ``SECAGG_FLOWER_DEPLOYMENT=1 pytest tests/test_flower_deployment.py``
(bench/RESULTS.md records its last run).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.skipif(
    os.environ.get("SECAGG_FLOWER_DEPLOYMENT") != "1",
    reason="about 3 minutes: set SECAGG_FLOWER_DEPLOYMENT=1 to run Flower's deployment engine",
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LINK = "127.0.0.1:8000"  # Flower 1.42's SuperLink serves its APIs on one HTTPS port

CHECKED_SERVER_APP = '''
"""The example's ServerApp, reporting what its process loaded."""
import json
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flower_digits import server_app
from secagg import keys

READS: list = []
_load = keys.load_for_client
keys.load_for_client = lambda folder: (READS.append(str(folder)), _load(folder))[1]
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    server_app.run(grid, config)
    maps = Path("/proc/self/maps").read_text().lower()
    report = {"imported": "tenseal" in sys.modules, "mapped": "tenseal" in maps, "reads": READS}
    Path(str(config["process-report"])).write_text(json.dumps(report))
'''


def _certificates(folder: Path) -> None:
    """A CA, the SuperLink's certificate for 127.0.0.1, and three SuperNodes' key pairs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer):  # type: ignore[no-untyped-def]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if subject == "test CA":
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        else:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        return builder.sign(signer, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = certificate("test CA", ca_key, ca_name, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "superlink.crt").write_bytes(
        certificate("superlink", key, ca_name, ca_key).public_bytes(pem)
    )
    plain = serialization.NoEncryption()
    (folder / "superlink.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain)
    )
    for i in range(3):
        node = ec.generate_private_key(ec.SECP384R1())
        private = node.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain)
        (folder / f"node{i}").write_bytes(private)
        public = node.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        (folder / f"node{i}.pub").write_bytes(public)


def test_a_flower_app_runs_with_he_in_flowers_deployment_engine(
    tmp_path: Path, session_keys: Path
) -> None:
    """A SuperLink (TLS, SuperNode authentication on), three registered SuperNodes, and the
    example app by ``flwr run``: the round adds the three nodes' updates under HE, every node
    ends with the same model, and the ServerApp's process (started by the SuperLink) never
    imports or maps TenSEAL and never reads a secret key."""
    certs, home, keys = tmp_path / "certs", tmp_path / "home", tmp_path / "keys"
    for folder in (certs, home, tmp_path / "models"):
        folder.mkdir()
    _certificates(certs)
    shutil.copytree(session_keys, keys)
    app = tmp_path / "app"
    shutil.copytree(ROOT / "examples" / "flower", app, ignore=shutil.ignore_patterns("keys"))
    (app / "flower_digits" / "checked.py").write_text(CHECKED_SERVER_APP)
    project = (app / "pyproject.toml").read_text()
    project = project.replace("flower_digits.server_app:app", "flower_digits.checked:app")
    project = project.replace('save-model = ""', 'save-model = ""\nprocess-report = ""')
    (app / "pyproject.toml").write_text(project)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "dep"\n\n[superlink.dep]\naddress = "{LINK}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *command: str) -> None:
        out = (logs / f"{name}.log").open("wb")
        processes.append(
            subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
        )

    try:
        start(
            "superlink",
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "superlink.crt"),
            "--ssl-keyfile", str(certs / "superlink.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", str(tmp_path / "state.db"),
        )  # fmt: skip
        _wait_for(logs / "superlink.log", "Application startup complete", 60)
        for i in range(3):
            registered = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(certs / f"node{i}.pub"), "dep"],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert "registered successfully" in registered.stdout, registered.stdout
        for i in range(3):
            start(
                f"supernode{i}",
                str(BIN / "flower-supernode"),
                "--root-certificates", str(certs / "ca.crt"),
                "--superlink", LINK,
                "--auth-supernode-private-key", str(certs / f"node{i}"),
                "--auth-supernode-public-key", str(certs / f"node{i}.pub"),
                "--node-config",
                f'partition-id={i} num-partitions=3 secagg-keys="{keys}" '
                f'secagg-save-model="{tmp_path / "models"}/{{node}}.npz"',
                "--port", str(9094 + i),
            )  # fmt: skip
        settings = (
            f'num-server-rounds=1 min-nodes=3 secagg-keys="{keys}" '
            f'process-report="{tmp_path / "report.json"}"'
        )
        done = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "dep", "--stream", "--run-config", settings],
            cwd=app, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        for process in processes:  # each with what it started (a SuperNode's SuperExec)
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "[ROUND 1/1] 3 nodes" in out, out[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == {"imported": False, "mapped": False, "reads": []}
    models = sorted((tmp_path / "models").glob("*.npz"))
    assert len(models) == 3
    arrays = [dict(np.load(path)) for path in models]
    for other in arrays[1:]:
        assert all(np.array_equal(arrays[0][k], v) for k, v in other.items())


def _wait_for(log: Path, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{log.name}: no {text!r} within {seconds} s")
