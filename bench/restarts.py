"""A server SIGKILLed at random points of a deployment, and restarted each time, ends where an
uninterrupted run of the same job does, with every site back (issue 25).

Provisions a project of three sites on localhost, serves an HE job with masks from a server
process to three site processes over mutual TLS, and kills the server ``--kills`` times at
random moments (a delay drawn after each start), restarting it with the same ``--workdir``
each time. Then it runs the same job uninterrupted, in one process, with the same keys, and
compares every site's model with that one, bit for bit. It prints where each kill landed (the
server's last line) and the verdict, and exits 1 unless every site ends with the same model.

    python bench/restarts.py                 # 5 kills, seed 0 (~2 min on 2 cores)
    python bench/restarts.py --kills 10 --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from secagg.config import RunConfig, dump_job  # noqa: E402
from secagg.provision import provision  # noqa: E402

SECAGG = [sys.executable, "-m", "secagg.cli"]
SITES = ("site-1", "site-2", "site-3")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server(project: Path, job: Path, work: Path, port: int, log: Path) -> subprocess.Popen:
    command = [*SECAGG, "server", str(job), "--kit", str(project / "server"), "--workdir",
               str(work / "server"), "--bind", f"127.0.0.1:{port}"]  # fmt: skip
    return subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT)


def _site(project: Path, name: str, work: Path, logs: Path) -> subprocess.Popen:
    command = [*SECAGG, "client", "--kit", str(project / name), "--workdir", str(work / name),
               "--wait", "300"]  # fmt: skip
    log = (logs / f"{name}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--earliest", type=float, default=3.0, help="s after a start")
    parser.add_argument("--latest", type=float, default=5.0, help="s after a start")
    args = parser.parse_args(argv)
    draw = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="secagg-restarts-"))
    port = _free_port()
    project = root / "project"
    provision(project, f"localhost:{port}", list(SITES), threshold=3)
    config = RunConfig(he=True, clients=3, rounds=args.rounds, local_epochs=30, tracking=False)
    job = root / "job.toml"
    job.write_text(dump_job(config))
    work, logs = root / "work", root / "logs"
    logs.mkdir()
    sites = [_site(project, name, work, logs) for name in SITES]
    server_log = logs / "server.log"
    started = time.monotonic()
    kills = []
    try:
        server = _server(project, job, work, port, server_log)
        for _ in range(args.kills):
            delay = draw.uniform(args.earliest, args.latest)
            try:
                server.wait(timeout=delay)
                break  # the job ended before this kill
            except subprocess.TimeoutExpired:
                pass
            server.send_signal(signal.SIGKILL)
            server.wait()
            lines = server_log.read_text().strip().splitlines()
            state = work / "server" / "state.json"
            done = json.loads(state.read_text())["round"] if state.exists() else 0
            kills.append({"after_s": round(delay, 1), "rounds_done": done, "last": lines[-1]})
            print(f"kill {len(kills)} after {delay:.1f} s, {done} round(s) done: {lines[-1]}")
            server = _server(project, job, work, port, server_log)
        server.wait(timeout=900)
        ended = [site.wait(timeout=120) for site in sites]
    finally:
        for process in [server, *sites]:
            if process.poll() is None:
                process.kill()
    seconds = time.monotonic() - started
    if server.returncode != 0 or any(ended):
        print(f"the job did not end cleanly: server {server.returncode}, sites {ended}; "
              f"logs in {logs}")  # fmt: skip
        return 1
    keys = root / "keys"
    keys.mkdir()
    for name, kit in (("client.ctx", "site-1"), ("server.ctx", "server"),
                      ("manifest.json", "server")):  # fmt: skip
        (keys / name).write_bytes((project / kit / name).read_bytes())
        os.chmod(keys / name, 0o600)
    straight = subprocess.run(
        [*SECAGG, "run", str(job), "--keys", str(keys), "--output", str(root / "straight"),
         "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    if straight.returncode != 0:
        print(straight.stderr[-2000:])
        return 1
    import torch

    expected = torch.load(root / "straight" / "model.pt")
    same = {}
    for name in SITES:
        model = torch.load(work / name / "model.pt")
        same[name] = all(torch.equal(model[k], v) for k, v in expected.items())
    print(json.dumps({"kills": kills, "seconds": round(seconds, 1), "same_model": same}, indent=2))
    print(
        f"{len(kills)} kill(s); job ended in {seconds:.0f} s; every site's model equal to an "
        f"uninterrupted run's: {all(same.values())}"
    )
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
