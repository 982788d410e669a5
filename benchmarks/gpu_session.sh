#!/usr/bin/env bash
# Every GPU check of the CUDA path in one command, for a machine with one H100/H200 (about 9
# minutes): the Triton kernels and CUDA-graph decode against the torch reference on the real
# GPU, float32 greedy parity with transformers on CUDA, single-stream decode (with and without
# CUDA graphs) and 4096-token prefill of the Llama-3-8B shape against the measured HBM
# bandwidth and matmul rate, and nano-vllm's offline-throughput recipe against transformers.
#
#   bash benchmarks/gpu_session.sh            # results in $OUT, else benchmarks/results/gpu/
#
# Each step has its own time limit and a failure does not stop the later ones, so one run
# always brings back what it could measure.
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results/gpu}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

python3 -m pip install --quiet --no-deps -e . || exit 1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$RESULTS/gpu_versions.txt"

timeout 240 python3 -m pytest -q tests/attention tests/engine/test_decode_graphs.py tests/engine/test_parity.py \
  2>&1 | tail -15 | tee "$RESULTS/gpu_tests.txt"
timeout 150 python3 benchmarks/gpu_decode.py --repeats 3 --out "$RESULTS/gpu_decode_llama-3-8b_graphs.json" \
  2>&1 | grep -v "^INFO" | tail -5
timeout 120 python3 benchmarks/gpu_decode.py --repeats 2 --prefill-len 512 --enforce-eager \
  --out "$RESULTS/gpu_decode_llama-3-8b_eager.json" 2>&1 | grep -v "^INFO" | tail -3
timeout 240 python3 benchmarks/offline_throughput.py --device cuda --preset qwen3-0.6b --num-prompts 256 \
  --input-len 100 1024 --output-len 100 1024 --hf-batch-size 64 --repeats 1 \
  --out "$RESULTS/offline_throughput_qwen3-0.6b_gpu.json" 2>&1 | grep -v "^INFO" | tail -5
