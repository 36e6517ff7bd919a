#!/usr/bin/env bash
# The GPU check of issues 13 and 16, one prepared script for a machine with a CUDA GPU (about 6-7 minutes on one H200):
#   1. the fused-vs-plain exactness tests of the DSR neuron on CUDA (tests/test_kernels.py: bit-identical spikes,
#      fp32 and bf16, ragged sizes, T=1);
#   2. `harness bench neuron`: one DSR layer, plain and fused, against one x.clone() (GB/s), fp32 and bf16;
#   3. `harness bench step` fp32 and bf16: preact_resnet18_cifar at 32x32, preact_resnet34 at 224, vgg11_dvs at
#      48x48 (2 polarity channels), ANN at batch T*B as the floor, with --peer spikingjelly when it is importable;
#   4. a 1-epoch CIFAR-shaped DSR training on synthetic CIFAR-10 files (the real on-disk format) through
#      `harness launch` with engine.kind: ddp on one GPU (NCCL, one process), bf16, channels-last, fused SGD;
#   5. its resume for a second epoch in fp16 (issue 16: the bf16 checkpoint's CUDA RNG state of this GPU only, an
#      empty loss-scaler state handed to an enabled GradScaler), under srun-like visibility (CUDA_VISIBLE_DEVICES=0).
# Step 1 also runs tests/test_cuda_proxies.py (issue 16's CPU proxies, and on CUDA: QCFS in fp32 under bf16
# autocast converting exactly, the fused optimizer, the CUDA RNG round trip).
# Every table lands in $OUT (the device tool's folder that comes back) or results/bench/gpu/, with a log.
#
# On the lent GPU machine (no network): first, here, `bash bench/gpu_wheels.sh` (fills .whl/ with what the image
# lacks); then run with the device tool, carrying .whl:
#   bash bench/gpu_check.sh
# Each step runs under its own time limit and the script goes on after a failure (its exit code is the number of
# failed steps), so one broken step does not cost the others' figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-results/bench/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
HARNESS="$PY -m harness.cli"
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log it, count a failure
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s)" | tee -a "$OUT_DIR/gpu_check.log"
  if ! timeout "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/gpu_check.log"; then
    echo "=== $name FAILED" | tee -a "$OUT_DIR/gpu_check.log"; failed=$((failed + 1))
  fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu_check.log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT_DIR/gpu_check.log"
PEER=$($PY -c "import spikingjelly.activation_based.neuron" 2>/dev/null && echo "--peer spikingjelly" || echo "")

step exactness 90 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_step_engine.py \
  tests/test_cuda_proxies.py -k "cuda or triton" -m "not slow"
step neuron 60 $HARNESS bench neuron --shape 64,32,32 --T 4,8 --batch 128 --precision fp32,bf16 --device cuda $PEER \
  --out-dir "$OUT_DIR"
for precision in fp32 bf16; do
  step "step-cifar-$precision" 70 $HARNESS bench step --backbone preact_resnet18_cifar --input 3,32,32 \
    --methods ann,dsr,sg --T 4,8 --batch 128 --precision $precision --device cuda $PEER --out-dir "$OUT_DIR"
done
step step-imagenet-bf16 70 $HARNESS bench step --backbone preact_resnet34 --input 3,224,224 --classes 1000 \
  --methods ann,dsr,sg --T 4 --batch 32 --precision bf16 --device cuda $PEER --out-dir "$OUT_DIR"
step step-dvs-bf16 40 $HARNESS bench step --backbone vgg11_dvs --input 2,48,48 --methods ann,dsr,sg --T 8 \
  --batch 32 --precision bf16 --device cuda $PEER --out-dir "$OUT_DIR"

DATA=$(mktemp -d)
$PY -c "from pathlib import Path; from tests.fakedata import write_cifar10; write_cifar10(Path('$DATA'), per_batch=2000, test=2000)"
cat > "$DATA/gpu_cifar.yaml" <<YAML
name: gpu_cifar_dsr
data: {dataset: cifar10, root: $DATA, batch_size: 256, workers: 8}
model: {backbone: preact_resnet18_cifar}
method: {name: dsr, neuron: if, T: 4}
optim: {name: sgd, lr: 0.1, epochs: 1, warmup_iters: 10}
engine: {kind: ddp, device: cuda, precision: bf16, channels_last: true}
track: {experiment: gpu_check, tracking_uri: "sqlite:///$DATA/mlflow.db", output_dir: $DATA/runs}
YAML
step train-ddp-1gpu 110 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m harness.cli launch \
  "$DATA/gpu_cifar.yaml"
step resume-fp16 90 env CUDA_VISIBLE_DEVICES=0 $PY -m torch.distributed.run --standalone --nproc_per_node=1 \
  -m harness.cli launch "$DATA/gpu_cifar.yaml" --resume latest -o optim.epochs=2 -o engine.precision=fp16
echo "gpu_check: $failed step(s) failed" | tee -a "$OUT_DIR/gpu_check.log"
exit $failed
