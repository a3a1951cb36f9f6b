#!/usr/bin/env bash
# The one GPU check: the gpu-marked tests, then the GPU benchmarks into benchmarks/results/gpu_*.{json,md}.
#
#   bash benchmarks/gpu_check.sh                  # a CUDA machine with the project installed (make install FAISS=gpu);
#                                                 # sized for at most 8 minutes on one H200
#   bash benchmarks/gpu_check.sh --cpu-rehearsal  # the same steps and code paths on CPU at toy sizes; results go
#                                                 # to $AMOE_BENCH_RESULTS (default: a temporary folder), never results/
#
#   1. tests -m gpu: compiled FlexAttention = dense mask (and its gradients with qk-norm under bf16), bf16 step vs
#      fp32, Triton student vs loop (fp32, bf16),
#      torch.compile vs eager, no host sync in the Triton MoE layer, 2-GPU torchrun = 1 GPU (where 2 GPUs exist)
#   2. MoE layer forward+backward, bf16, 65,536 tokens, d=768: triton vs torch vs loop vs dense, E=8 k=2, E=28 k=6
#   3. cache-teachers with a DINOv3 ViT-L/16 (random init) at <=256 and <=1024 tokens an image vs its bare forward
#   4. training tokens/s of the amoe preset, packed vs padded, on a store cached here
#   5. faiss k-means, 1M x 384, three levels (on the GPU when faiss-gpu sees one)
# Every step runs even when an earlier one fails; the script exits 1 if any failed (the log says which).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "${1:-}" = "--cpu-rehearsal" ]; then
  MODE=rehearsal DEVICE=cpu SCALE=3  # the interpreter and two CPU cores are slow: looser time limits
  export TRITON_INTERPRET=1 AMOE_GPU_TEST_DEVICE=cpu
  export AMOE_BENCH_RESULTS=${AMOE_BENCH_RESULTS:-$(mktemp -d -t amoe-rehearsal-XXXX)}
elif [ $# -eq 0 ]; then
  MODE=gpu DEVICE=cuda SCALE=1  # the limits below add up to 630 s (each stops only its own step); expected under 8 min
  export TRITON_INTERPRET=0  # compiled kernels: the tests would otherwise set the interpreter (slow, host copies)
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: gpu_check.sh: torch sees no CUDA GPU here; use --cpu-rehearsal to rehearse on CPU" >&2
    exit 2
  fi
else
  echo "error: gpu_check.sh: unknown argument '$1' (only --cpu-rehearsal)" >&2
  exit 2
fi
RESULTS=${AMOE_BENCH_RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
WORK=$(mktemp -d -t amoe-gpu-check-XXXX)
trap 'rm -rf "$WORK"' EXIT
LOG="$RESULTS/${MODE}_check.log"
: > "$LOG"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit (x SCALE), log, remember a failure
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

if [ "$MODE" = gpu ]; then
  TOKENS=65536 IMAGES=1200 BIG_IMAGES=400 KMEANS_N=1000000 LEVELS=10000,1000,100 FIT=100000 TARGET=100000
  THREADS=16 PRESET=amoe SEQ=2048 SEQS=8 PADDED=16 STEPS=20 LARGE=vit_large BIG_MIN=784 BIG_MAX=1024
  STORE_DIGITS=200 STORE_MAX=1024 STORE_TEACHER=timm:vit_small_patch16_dinov3
else
  TOKENS=256 IMAGES=12 BIG_IMAGES=8 KMEANS_N=20000 LEVELS=200,50,10 FIT=5000 TARGET=2000
  THREADS=2 PRESET=tiny SEQ=160 SEQS=2 PADDED=4 STEPS=2 LARGE=vit_tiny BIG_MIN=16 BIG_MAX=64
  STORE_DIGITS=27 STORE_MAX=64 STORE_TEACHER=timm:vit_small_patch16_dinov3,depth=2,embed_dim=64,num_heads=2
fi

"$PY" - > "$RESULTS/${MODE}_env.json" <<'EOF'
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    import faiss
    info["faiss"], info["faiss_gpus"] = faiss.__version__, getattr(faiss, "get_num_gpus", lambda: 0)()
except ImportError:
    info["faiss"] = None
if info.get("faiss_gpus"):  # a wheel without this GPU's kernels aborts the process: probe in a child
    import subprocess, sys
    probe = ("import faiss, numpy as np; i = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), 8); "
             "x = np.random.rand(64, 8).astype('float32'); i.add(x); assert (i.search(x, 1)[1][:, 0] == np.arange(64)).all()")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    info["faiss_gpu_search"] = "ok" if r.returncode == 0 else f"failed ({r.returncode}): {r.stderr.strip()[-300:]}"
print(json.dumps(info))
EOF
cat "$RESULTS/${MODE}_env.json" | tee -a "$LOG" || failed+=(environment)

step tests 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/train/test_train_gpu.py tests/train/test_moe_ops.py
if [ "$MODE" = gpu ]; then
  step moe_layer 70 "$PY" benchmarks/moe_layer.py --device cuda --tokens "$TOKENS" --dtype bfloat16 \
    --backends triton,torch,loop --configs 8x2,28x6 --name "${MODE}_moe_layer"
else  # the interpreter runs Triton on CPU in float32 only
  step moe_layer 70 "$PY" benchmarks/moe_layer.py --device cpu --tokens "$TOKENS" --dim 64 --dtype float32 \
    --backends triton,torch,loop --configs 8x2,28x6 --repeats 1 --name "${MODE}_moe_layer"
fi
# --fidelity-units 1: a real store has thousands of units, of which 64 measure their codec (here: every unit)
step cache_256 80 "$PY" benchmarks/cache_teachers.py --device "$DEVICE" --teachers "$LARGE" --images "$IMAGES" \
  --min-tokens 16 --max-tokens 256 --reads 0 --fidelity-units 1 --name "${MODE}_cache_teachers_256"
# 784-1024 tokens an image: fewer images (each is ~4x the rows of the step above, for the writer as for the GPU)
step cache_1024 100 "$PY" benchmarks/cache_teachers.py --device "$DEVICE" --teachers "$LARGE" --images "$BIG_IMAGES" \
  --min-tokens "$BIG_MIN" --max-tokens "$BIG_MAX" --reads 0 --fidelity-units 1 --name "${MODE}_cache_teachers_1024"
# a mixed-resolution store for packed vs padded: the 21 photos (288-1024 tokens on a GPU) among 16-token digits
step store 60 bash -c "'$PY' -m pipeline.cli data demo '$WORK/images' > /dev/null && \
  { ls '$WORK'/images/photos/*.png; ls '$WORK'/images/digits/*.png | head -n $STORE_DIGITS; } > '$WORK/list.txt' && \
  '$PY' -m pipeline.cli cache-teachers '$WORK/list.txt' --store '$WORK/store' --device '$DEVICE' \
  --teacher '$STORE_TEACHER' --random-init --name dino --min-tokens 16 --max-tokens $STORE_MAX > /dev/null"
step packing 60 "$PY" benchmarks/packing.py --store "$WORK/store" --device "$DEVICE" --preset "$PRESET" \
  --seq-len "$SEQ" --seqs "$SEQS" --images "$PADDED" --steps "$STEPS" --warmup 2 --name "${MODE}_packing"
step kmeans 60 "$PY" benchmarks/curation_kmeans.py --n "$KMEANS_N" --levels "$LEVELS" --fit-sample "$FIT" \
  --target "$TARGET" --threads "$THREADS" --name "${MODE}_curation_kmeans"

echo "results in $RESULTS (log: $LOG)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: gpu_check.sh: failed steps: ${failed[*]}" >&2
  exit 1
fi
