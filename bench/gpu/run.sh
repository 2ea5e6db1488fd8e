#!/usr/bin/env bash
# The one prepared run for a lent GPU (issue 17 §4), in the repository's root on that machine:
#   bash bench/gpu/wheels.sh                                  # here, first
#   device run: bash bench/gpu/run.sh   (carry [".whl"], timeout_s 590)
# Writes into $OUT (or /tmp/gpu-out): the GPU's name, `python -m bench --device cuda --brief` for the shipped
# model and for a CIFAR-10 ResNet-110 with random weights (L, library ÷ L, service ÷ L at K = 1…64, latency,
# mixed load), and bench.gpu_checks for both (syncs per batch, one n = 100,000 CERTIFY's time). Afterwards,
# here: copy the two cuda-*.json into bench/results/ and render BENCHMARKS.md (bench.report.write_report).
# PYTHON, DEVICE, SIZE, ARCH and N change the device, the run's sizes, the second model and the CERTIFY's n (a smoke
# test on a CPU: PYTHON=.venv/bin/python DEVICE=cpu SIZE=--quick ARCH=cifar_resnet20 N=2000 bash bench/gpu/run.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}" OUT="${OUT:-/tmp/gpu-out}" DEVICE="${DEVICE:-cuda}" SIZE="${SIZE:---brief}" ARCH="${ARCH:-cifar_resnet110}" N="${N:-100000}"
MODEL="cifar10-${ARCH#cifar_}-random" R110=/tmp/random-models
mkdir -p "$OUT"
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
{ nvidia-smi -L || true; "$PYTHON" -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available())'; } \
  | tee "$OUT/device.txt"
"$PYTHON" -m bench.gpu_checks make-model --arch "$ARCH" --model-dir "$R110"
"$PYTHON" -m bench.gpu_checks check --model-dir checkpoints --model fmnist-resnet-sigma0.25 --device "$DEVICE" \
  --n "$N" --out "$OUT/checks-fmnist.json"
"$PYTHON" -m bench.gpu_checks check --model-dir "$R110" --model "$MODEL" --device "$DEVICE" --n "$N" \
  --out "$OUT/checks-random.json"
for spec in "checkpoints fmnist-resnet-sigma0.25 fmnist" "$R110 $MODEL random"; do
  set -- $spec
  "$PYTHON" -m bench --device "$DEVICE" "$SIZE" --model-dir "$1" --model "$2" --out "$OUT/$DEVICE-$3.json" \
    --report "$OUT/report.md" > "$OUT/bench-$3.log" 2>&1 || echo "bench of $2 failed: see bench-$3.log"
  grep -E 'done in|Error' "$OUT/bench-$3.log" || true
done
