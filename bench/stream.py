"""Stream one large HE payload through the real gRPC service, up and back down.

    python bench/stream.py                      # a 100M-parameter model's payload (~1.07 GB)
    python bench/stream.py --params 10000000

A throwaway project is provisioned on localhost; the server's service (``grpc_server``) runs in
this process with mutual TLS, and one site uploads its encrypted update in 1 MiB chunks, as in a
round's seal phase: header checked on the first chunk, the whole payload checked like the sum
would, then queued. The site then downloads it back as if it were the round's aggregate. The
update is an encryption of zeros: ciphertexts look random whatever they hold, so it costs what
any update of that size does. Prints the payload size and the time and rate each way.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secagg import keys
from secagg.crypto import Stamp, Update
from secagg.crypto.ckks import CkksClient
from secagg.crypto.ckks_server import CkksServer
from secagg.messages import ModelSignature
from secagg.provision import load_kit, provision
from secagg.transport.grpc_client import Connection
from secagg.transport.grpc_server import Coordinator, Service, start


def stream(params: int, scratch: Path) -> dict[str, float]:
    """Upload and download one payload of ``params`` values; return sizes and timings."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provision(scratch, f"localhost:{port}", ["site-1"])
    server_kit = load_kit(scratch / "server", "server")
    site_kit = load_kit(scratch / "site-1", "client")
    cipher = CkksServer(keys.load_for_server(server_kit.folder))
    client = CkksClient(keys.load_for_client(site_kit.folder))
    job = os.urandom(16)
    coordinator = Coordinator(
        server_kit, cipher, {}, job, scratch / "work", 0, liveness=600, max_samples=1
    )
    # The job's model: one tensor of ``params`` values (what every payload's size follows).
    coordinator.model = ModelSignature([("w", (params,), "float32")], "")
    service = Service(coordinator, 1 << 36, stall=600, deadline=3600)
    server, _ = start(service, server_kit, f"127.0.0.1:{port}")
    try:
        connection = Connection(site_kit, f"localhost:{port}")
        connection.call("Join", {"samples": 1})
        task = coordinator.post("seal", 1, frozenset({0}))
        start_encrypt = time.perf_counter()
        payload = client.encrypt(Update(np.zeros(params), 1.0), Stamp(job, 1, 0, 1))
        encrypted = time.perf_counter()
        received: list[bytes] = []
        taker = threading.Thread(
            target=lambda: received.extend(u.payload for u in coordinator.collect(task, 3600))
        )
        taker.start()
        connection.upload({"task": task.id}, payload)
        taker.join()
        uploaded = time.perf_counter()
        coordinator.publish(1, "update", received[0])
        back = connection.download(1, "update")
        downloaded = time.perf_counter()
        connection.close()
        if back != payload or received[0] != payload:
            raise SystemExit("the payload did not come through intact")
        size = len(payload)
        return {
            "params": params,
            "payload_bytes": size,
            "encrypt_s": encrypted - start_encrypt,
            "upload_s": uploaded - encrypted,
            "download_s": downloaded - uploaded,
            "upload_mb_s": size / 1e6 / (uploaded - encrypted),
            "download_mb_s": size / 1e6 / (downloaded - uploaded),
        }
    finally:
        server.stop(grace=None)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="secagg-stream-") as scratch:
        result = stream(args.params, Path(scratch))
    print(
        f"{result['params']:,} parameters: payload {result['payload_bytes'] / 1e9:.2f} GB "
        f"({result['payload_bytes'] / result['params']:.2f} B/param), encrypted in "
        f"{result['encrypt_s']:.1f} s; upload {result['upload_s']:.1f} s "
        f"({result['upload_mb_s']:.0f} MB/s), download {result['download_s']:.1f} s "
        f"({result['download_mb_s']:.0f} MB/s), 1 MiB chunks over mutual TLS on loopback"
    )
    return result


if __name__ == "__main__":
    main()
