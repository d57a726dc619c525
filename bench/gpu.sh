#!/usr/bin/env bash
# The headline job on a GPU, HE and plaintext, in one command (issue 13, target 4):
#
#     bash bench/gpu.sh                 # on a CUDA machine: about 3-5 minutes after the install
#     DEVICE=cpu JOB=jobs/digits.toml bash bench/gpu.sh   # the script on a CPU, a small job
#
# Training runs on the GPU (the job's device is "auto"); encryption runs on the CPU cores, and
# its costly part (the encryptions of zero) in a background thread while the model trains. The
# script prints HE / plaintext wall time and round latency, and the GPU's idle share while
# clients encrypt: the share of an HE round's deployment latency that is not a client's training
# (the scale exchange, encryption, the server's sum, decryption: the GPU has no work then), from
# the round loop's per-step timings. With nvidia-smi present it also samples the GPU's
# utilisation during the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
args=(--no-memory --repeats 1 --no-tracking --out "$OUT")
[[ -n "${ROUNDS:-}" ]] && args+=(--rounds "$ROUNDS")
[[ -n "${KEYS:-}" ]] && args+=(--keys "$KEYS")
job=$(mktemp --suffix=.toml)
trap 'rm -f "$job"; [[ -n "${smi:-}" ]] && kill "$smi" 2>/dev/null || true' EXIT
sed "s/^device = .*//" "${JOB:-jobs/bench_moderate_cnn.toml}" > "$job"
echo "device = \"${DEVICE:-auto}\"" >> "$job"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 250 \
    > "$OUT/nvidia-smi.csv" &
  smi=$!
fi
"$PYTHON" bench/compare_he.py --job "$job" "${args[@]}" > "$OUT/report.md"
latest=$(ls -t "$OUT"/*.json | head -1)
"$PYTHON" - "$latest" "$OUT/nvidia-smi.csv" <<'EOF'
import json, sys
from pathlib import Path

report = json.loads(Path(sys.argv[1]).read_text())
he, ratios = report["he"], report["ratios"]
steps, clients = he["seconds_per_round"], report["job"]["clients"]
latency = he["deployment_latency_seconds"] / len(report["rounds"])
# step times are summed over the round's clients: a client's own share is the mean
training = (steps["train"] + steps["flatten"]) / clients
crypto = max(latency - training, 0.0)
print(f"device: {report['machine']['device']}")
print(f"HE / plaintext, wall time: {ratios['simulated_wall_time']:.2f}x  (target <= 1.3; FLARE 2.7x)")
print(f"HE / plaintext, round latency: {ratios['deployment_latency']:.2f}x")
print(f"HE round latency {latency:.2f} s, of which not training (GPU idle): {crypto:.2f} s "
      f"= {100 * crypto / latency:.1f}%; per client: scales {steps['scales'] / clients:.3f} s, "
      f"encrypt {steps['encrypt'] / clients:.3f} s, decrypt {steps['decrypt'] / clients:.3f} s; "
      f"server sum {steps['aggregate']:.3f} s")
smi = Path(sys.argv[2])
if smi.exists() and smi.stat().st_size:
    busy = [int(line.split(",")[1].strip().split()[0]) for line in smi.read_text().splitlines()]
    idle = sum(1 for u in busy if u == 0) / len(busy)
    print(f"nvidia-smi, whole run: {len(busy)} samples, {100 * idle:.1f}% at 0% utilisation")
print(f"report: {sys.argv[1]}")
EOF
