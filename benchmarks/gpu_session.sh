#!/usr/bin/env bash
# Every GPU check of the CUDA path in one command, for a machine with one H100/H200: the Triton
# kernels and CUDA-graph decode against the torch reference on the real GPU, float32 greedy
# parity with transformers on CUDA, single-stream decode and 4096-token prefill of the
# Llama-3-8B shape against the measured HBM bandwidth and matmul rate, nano-vllm's
# offline-throughput recipe against transformers, decode without CUDA graphs, and the
# dequantizing w8/w4 matmuls (their tests, then their speed against the bf16 cuBLAS matmul on
# Llama-3-8B and Qwen2.5-0.5B shapes).
#
#   bash benchmarks/gpu_session.sh            # results in $OUT, else benchmarks/results/gpu/
#
# The whole run keeps within GPU_SESSION_SECONDS (default 540): each step has its own cap, cut
# to the time that is left, and a failure does not stop the later ones. The steps run in the
# order of what they prove (correctness, then the three speed targets, then the eager
# comparison), each benchmark rewrites its JSON as it goes, and every step's whole output is
# logged in $RESULTS as it runs, so a run cut short still brings back what it measured.
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results/gpu}"
BUDGET="${GPU_SESSION_SECONDS:-540}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
# Caches where a fresh machine surely lets us write (random checkpoints reach 16 GB).
export FITSERVE_BENCH_CACHE="${FITSERVE_BENCH_CACHE:-/tmp/fitserve-bench}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"

# step CAP_SECONDS COMMAND...: run COMMAND for at most CAP_SECONDS or the time left, if any.
step() {
  local cap=$1 left=$((BUDGET - SECONDS))
  shift
  if ((left < 30)); then
    echo "skipped (${left}s left): $*" | tee -a "$RESULTS/gpu_session_log.txt"
    return 0
  fi
  ((cap > left)) && cap=$left
  echo "[${SECONDS}s] $* (cap ${cap}s)" | tee -a "$RESULTS/gpu_session_log.txt"
  timeout "$cap" "$@"
  echo "[${SECONDS}s] exit $?" | tee -a "$RESULTS/gpu_session_log.txt"
}

# Run from the source tree: the GPU machines have torch, Triton, transformers and the other
# dependencies but no package index, so `pip install -e .` (which fetches setuptools for its
# isolated build) would fail there.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import fitserve" || exit 1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$RESULTS/gpu_versions.txt"

step 150 python3 -m pytest -q -p no:cacheprovider tests/attention tests/kernels/test_triton_ops.py \
  tests/models/test_llama_vs_hf.py tests/engine/test_decode_graphs.py tests/engine/test_triton_path.py \
  tests/engine/test_parity.py \
  2>&1 | tee "$RESULTS/gpu_tests.log" | tail -15
step 150 python3 benchmarks/gpu_decode.py --repeats 3 --out "$RESULTS/gpu_decode_llama-3-8b_graphs.json" \
  2>&1 | tee "$RESULTS/gpu_decode_graphs.log" | grep -v "^INFO" | tail -6
step 220 python3 benchmarks/offline_throughput.py --device cuda --preset qwen3-0.6b --num-prompts 256 \
  --input-len 100 1024 --output-len 100 1024 --hf-batch-size 128 256 --repeats 1 \
  --out "$RESULTS/offline_throughput_qwen3-0.6b_gpu.json" 2>&1 | tee "$RESULTS/offline_throughput.log" \
  | grep -v "^INFO" | tail -6
step 90 python3 benchmarks/gpu_decode.py --repeats 2 --prefill-len 512 --enforce-eager \
  --out "$RESULTS/gpu_decode_llama-3-8b_eager.json" 2>&1 | tee "$RESULTS/gpu_decode_eager.log" \
  | grep -v "^INFO" | tail -4
# The dequantizing matmuls: their tests on the GPU (the bfloat16 code-decoding branch runs only
# there), then their speed.
step 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_quant.py \
  2>&1 | tee "$RESULTS/gpu_quant_tests.log" | tail -5
step 150 python3 benchmarks/gpu_quant_kernels.py --out "$RESULTS/gpu_quant_kernels.json" \
  2>&1 | tee "$RESULTS/gpu_quant_kernels.log" | tail -45
