#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks of issue 4, results under $OUT. Usage:
#   benchmarks/gpu_check.sh tests|qwen|llama|latency|peer ...   (any subset, in order)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
summary="$OUT/summary.txt"; : > "$summary"
for what in "$@"; do
  case "$what" in
    tests)
      timeout 420 python3 -m pytest -q -p no:cacheprovider -x tests/layers/test_triton_ops.py \
        tests/engine/test_cuda_engine.py tests/models/test_models.py -k "cuda or triton or rotary or rms or silu" \
        2>&1 | tee "$OUT/tests.log" | tail -5
      echo "tests: $(tail -1 "$OUT/tests.log")" >> "$summary" ;;
    attn)
      timeout 420 python3 -m pytest -q -p no:cacheprovider tests/attention 2>&1 | tee "$OUT/attn.log" | tail -5
      echo "attention tests: $(tail -1 "$OUT/attn.log")" >> "$summary" ;;
    qwen)
      timeout 300 python3 -m pagellm.entrypoints.cli --log-level info bench throughput --workload qwen06b-nano \
        --peer none --output-json "$OUT/qwen06b-nano.json" 2>&1 | grep -v "Processed prompts" | tee "$OUT/qwen.log" | tail -4
      echo "qwen06b-nano: $(grep -E '^pagellm ' "$OUT/qwen.log")" >> "$summary" ;;
    llama)
      timeout 400 python3 -m pagellm.entrypoints.cli --log-level info bench throughput --workload llama8b-mixed \
        --peer none --output-json "$OUT/llama8b-mixed.json" 2>&1 | grep -v "Processed prompts" | tee "$OUT/llama.log" | tail -4
      echo "llama8b-mixed: $(grep -E '^pagellm ' "$OUT/llama.log")" >> "$summary" ;;
    peer)
      timeout 580 python3 -m pagellm.entrypoints.cli --log-level info bench throughput --workload llama8b-mixed \
        --peer hf --output-json "$OUT/llama8b-mixed-peer.json" 2>&1 | grep -v "Processed prompts" | tee "$OUT/peer.log" | tail -5
      echo "llama8b-mixed vs peer: $(grep -E '^(pagellm|transformers|ratio)' "$OUT/peer.log" | tr '\n' ' ')" >> "$summary" ;;
    latency)
      timeout 300 python3 -m pagellm.entrypoints.cli --log-level info bench latency --workload llama8b-mixed \
        --batch-size 1 --input-len 128 --output-len 256 --output-json "$OUT/llama8b-latency-bs1.json" 2>&1 \
        | tee "$OUT/latency.log" | tail -3
      echo "llama8b bs1: $(grep -E '^mean' "$OUT/latency.log")" >> "$summary" ;;
  esac
done
echo "===== summary"; cat "$summary"
