#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks, results under $OUT. Usage:
#   benchmarks/gpu_check.sh tests|embed|attn|attn-decode|attn-short|models|qwen|llama|latency|peer|host|spec|quant|fp8gemm|fp8-matrix|kvfp8|fallback|moe|moe-ep|x2-tests|x2-tp1|x2-tp2|x2-pp2|lora|
#                           mrope|vision|qwen2vl-bench|w4-tests|w4-gemv-tests|ncu-gemv|tune|tune-w4a16|tune-w4a16-m1|tune-w4a16-m128|tune-moe|
#                           bake ...
#   (any subset, in order)
# models = issue 16 part 1: the sliding-window cases of the Triton attention tests against torch_ref, then a tiny
# Gemma 3 (interleaved sliding/global layers) through the CUDA engine, eager and with decode graphs.
# quant = quant-tests + quant-fp8 + quant-w4 (issue 15: kernel tests, then each bf16/quantized pair in one run);
# fp8gemm: where an fp8 linear's time goes (quantization, row-wise vs per-tensor _scaled_mm) against bf16.
# kvfp8 = kvfp8-tests + kvfp8-bench (issue 15's FP8 KV cache).
# fallback = fallback-tests + fallback-bench (issue 16: the transformers fallback on CUDA, and its speed against
# pagellm's own Qwen3 on the same dummy weights).
# moe = moe-tests + moe-bench (issue 16: fused MoE kernel tests and its time against the torch loop, then
# qwen3moe-mixed with the transformers peer in the same run; with the tile table's configs the tests compile more
# variants: run moe-tests and moe-bench as two calls); moe-ep (2 GPUs): qwen3moe-mixed at TP=2 and EP=2.
# x2-tp1, x2-tp2, x2-pp2 (2 GPUs, issue 12): llama8b-mixed on one GPU, at TP=2, at PP=2; x2-tests: the tiny TP=2 and
# PP=2 engines of tests/distributed/test_parallel.py on CUDA (decode graphs on) against one GPU.
# lora = lora-tests + lora-bench (issue 17's LoRA); lora-kernel: the LoRA kernels' GPU time per layer by tile config.
# mrope = mrope-tests + mrope-bench (issue 18's Qwen2-VL parts: M-RoPE, the vision tower, the model module on CUDA;
# then the tower against transformers' at Qwen2-VL-7B's shape and M-RoPE against 1-D RoPE, bf16, one run).
# vision = vision-tests + vision-bench (issue 18 part 2: tiny LLaVA and Qwen2-VL on CUDA, then llava7b-image with
# its peer); qwen2vl-bench: qwen2vl-image (Qwen2-VL-7B shape) with its peer, a part of its own (time).
# w4-tests = the W4A16 kernels only (every variant of triton_w4a16.py against the reference, the table's choice in
# a CUDA graph, the tiny GPTQ/AWQ engines; up to 8 minutes, mostly Triton compiling the variants): a call of its own.
# w4-gemv-tests = the batch-1 W4A16 kernel's CUDA checks only (M = 1 on every shape, split determinism, graphs).
# tune = benchmarks/tune_kernels.py: the tile-config sweep of the W4A16 and fused MoE kernels (under 5 minutes),
# winners under $OUT/tuned-w4a16.json and $OUT/tuned-moe.json (bake: tune_kernels.py --bake DIR); tune-w4a16
# and tune-moe sweep one kernel each with more time (one call each); tune-w4a16-m1 (-m128) sweeps W4A16 at M = 1 (128) only.
# A part written before:PART runs the checkout in .old/ (an earlier commit's pagellm/, e.g.
# `git archive COMMIT pagellm | tar -x -C .old`) instead, for a before/after pair measured in one run.
set -uo pipefail
BASE_PYTHONPATH=${PYTHONPATH:-}  # e.g. carried wheels installed with pip --target
# PYTHONSAFEPATH (Python >= 3.11): `python3 -m`/`-c` would put the working directory ahead of PYTHONPATH, so the
# checkout's pagellm/ would shadow .old/'s in a before: part.
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor PYTHONSAFEPATH=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
summary="$OUT/summary.txt"; : > "$summary"
# logged LABEL LOG SECONDS PATTERN CMD...: run CMD (cut at SECONDS) into $OUT/LOG, then add its lines matching
# PATTERN to the summary under LABEL.
logged() {
  local label=$1 log="$OUT/$2" secs=$3 pattern=$4; shift 4
  timeout "$secs" "$@" 2>&1 | grep -v "Processed prompts" | tee "$log" | tail -5
  echo "$label: $(grep -E "$pattern" "$log" | tr '\n' ' ')" >> "$summary"
}
BENCH=(python3 -m pagellm.entrypoints.cli --log-level info bench)
for part in "$@"; do
  what=$part tag=after
  export PYTHONPATH=$PWD:$BASE_PYTHONPATH
  case "$part" in before:*) what=${part#before:} tag=before; export PYTHONPATH=$PWD/.old:$PWD:$BASE_PYTHONPATH
    echo "$part runs $(python3 -c 'import importlib.util; print(importlib.util.find_spec("pagellm").origin)')" \
      | tee -a "$summary" ;; esac
  case "$what" in
    tests) logged tests tests.log 420 '(passed|failed|error)' python3 -m pytest -q -p no:cacheprovider -x \
             tests/layers/test_triton_ops.py tests/engine/test_cuda_engine.py tests/models/test_models.py \
             -k "cuda or triton or rotary or rms or silu" ;;
    embed) logged "pooling tests (CUDA, float32)" embed-tests.log 300 '(passed|failed|error)' python3 -m pytest -q \
             -p no:cacheprovider tests/pooling ;;
    attn-decode)  # the decode kernel's tile sweep at llama8b-mixed-like batches, bf16 cache and fp8 cache
      for kv in auto fp8; do
        logged "decode attention kv=$kv" "attn-decode-$kv.log" 200 '(sweep best|attend_decode graph)' python3 \
          benchmarks/attention_kernels.py --decode-only --sweep --kv-dtype "$kv" --json "$OUT/attn-decode-$kv.json"
      done ;;
    attn-short) logged "decode attention at short contexts" attn-short.log 200 'attend_decode graph' python3 \
        benchmarks/attention_kernels.py --short --json "$OUT/attn-short.json" ;;
    attn) logged "attention tests" attn.log 420 '(passed|failed|error)' python3 -m pytest -q -p no:cacheprovider \
            tests/attention ;;
    models) logged "sliding-window attention + Gemma 3 on CUDA" models.log 480 "(passed|failed|error)" \
              python3 -m pytest \
              -q -p no:cacheprovider tests/attention/test_triton_attention.py tests/models/test_gemma3.py \
              -k "win- or cuda_greedy" ;;
    qwen) logged "qwen06b-nano $tag" "qwen-$tag.log" 300 '^pagellm ' "${BENCH[@]}" throughput --workload qwen06b-nano \
            --peer none --output-json "$OUT/qwen06b-nano-$tag.json" ;;
    llama) logged "llama8b-mixed $tag" "llama-$tag.log" 400 '^pagellm ' "${BENCH[@]}" throughput \
             --workload llama8b-mixed --peer none --output-json "$OUT/llama8b-mixed-$tag.json" ;;
    x2-tests) logged "TP/PP on 2 GPUs against one" x2-tests.log 300 '(passed|failed|error)' python3 -m pytest -q \
        -p no:cacheprovider tests/distributed/test_parallel.py -k "mp_parallel_matches or (micro_batches and mp)" ;;
    x2-tp1|x2-tp2|x2-pp2)  # issue 12, on 2 GPUs: llama8b-mixed on one of them, at TP=2, at PP=2
      par=(); case "$what" in x2-tp2) par=(-tp 2) ;; x2-pp2) par=(--pipeline-parallel-size 2) ;; esac
      gpus=0,1; [ "$what" = x2-tp1 ] && gpus=0
      CUDA_VISIBLE_DEVICES=$gpus logged "llama8b-mixed ${what#x2-} $tag" "llama-$what-$tag.log" 300 '^pagellm ' \
        "${BENCH[@]}" throughput --workload llama8b-mixed --peer none "${par[@]}" \
        --output-json "$OUT/h200x2-${what#x2-}-llama8b-mixed-$tag.json" ;;
    peer) logged "llama8b-mixed vs peer" peer.log 580 '^(pagellm|transformers|ratio)' "${BENCH[@]}" throughput \
            --workload llama8b-mixed --peer hf --output-json "$OUT/llama8b-mixed-peer.json" ;;
    latency) logged "llama8b bs1 $tag" "latency-$tag.log" 300 '^mean' "${BENCH[@]}" latency --workload llama8b-mixed \
               --batch-size 1 --input-len 128 --output-len 256 --output-json "$OUT/llama8b-latency-bs1-$tag.json" ;;
    spec) SPEC='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}'
          logged "verify cost" spec-verify.log 300 '^batch' python3 benchmarks/spec_verify_cost.py \
            --out "$OUT/spec-verify-cost.json"
          for bs in 1 32; do
            logged "llama8b bs$bs spec off" "spec-bs$bs-off.log" 300 '^mean' "${BENCH[@]}" latency \
              --workload llama8b-mixed --batch-size $bs --input-len 128 --output-len 256 \
              --output-json "$OUT/llama8b-latency-bs$bs-spec-off.json"
            logged "llama8b bs$bs spec ngram" "spec-bs$bs-on.log" 300 '^(mean|speculative)' "${BENCH[@]}" latency \
              --workload llama8b-mixed --batch-size $bs --input-len 128 --output-len 256 --speculative-config "$SPEC" \
              --output-json "$OUT/llama8b-latency-bs$bs-spec-ngram.json"
          done
          logged "llama8b-mixed spec off" spec-mixed-off.log 400 '^pagellm ' "${BENCH[@]}" throughput \
            --workload llama8b-mixed --peer none --output-json "$OUT/llama8b-mixed-spec-off.json"
          logged "llama8b-mixed spec ngram" spec-mixed-on.log 400 '^(pagellm |speculative)' "${BENCH[@]}" throughput \
            --workload llama8b-mixed --peer none --speculative-config "$SPEC" \
            --output-json "$OUT/llama8b-mixed-spec-ngram.json" ;;
    quant|quant-tests) logged "quant kernel tests" quant-tests.log 300 '(passed|failed|error)' python3 -m pytest -q \
            -p no:cacheprovider tests/layers/test_quantization_cuda.py -k "not w4a16" ;;&
    quant|quant-fp8)  # issue 15: fp8 W8A8 vs bf16 on llama8b-mixed, one run each, same call (target >= 1.35x);
      # with PROFILE=1 each run then repeats under torch.profiler and prints its top GPU kernels per output token
      for q in none fp8; do
        qflag=(); [ "$q" != none ] && qflag=(--quantization "$q")
        logged "llama8b-mixed $q" "llama-$q.log" 300 '^pagellm ' "${BENCH[@]}" throughput --workload llama8b-mixed \
          --peer none "${qflag[@]}" --output-json "$OUT/llama8b-mixed-$q.json" ${PROFILE:+--profile}
      done
      python3 benchmarks/quant_ratio.py throughput "$OUT/llama8b-mixed-none.json" "$OUT/llama8b-mixed-fp8.json" \
        1.35 | tee -a "$summary" ;;&
    fp8-matrix)  # llama8b-mixed: bf16, fp8 weights, fp8 KV cache, both; one run each, same call
      for qk in none:auto fp8:auto none:fp8 fp8:fp8; do
        q=${qk%:*} kv=${qk#*:}; qflag=(); [ "$q" != none ] && qflag=(--quantization "$q")
        logged "llama8b-mixed quantization=$q kv=$kv" "llama-$q-$kv.log" 200 '^pagellm ' "${BENCH[@]}" throughput \
          --workload llama8b-mixed --peer none "${qflag[@]}" --kv-cache-dtype "$kv" \
          --output-json "$OUT/llama8b-mixed-$q-kv-$kv.json"
      done ;;
    fp8gemm) logged "fp8 gemm parts" fp8-gemm.log 120 '^fp8 gemm' python3 benchmarks/fp8_gemm.py \
        --out "$OUT/fp8-gemm.json" ;;
    quant|quant-w4)  # issue 15: batch-1 decode, bf16 vs 4-bit GPTQ dummy weights (target >= 1.8x tokens/s); with
      # PROFILE=1 in the environment each run then prints its top GPU kernels per output token
      for q in none gptq; do
        qflag=(); [ "$q" != none ] && qflag=(--quantization "$q")
        logged "llama8b bs1 $q" "latency-$q.log" 240 '^mean' "${BENCH[@]}" latency --workload llama8b-mixed \
          --batch-size 1 --input-len 128 --output-len 256 "${qflag[@]}" --output-json "$OUT/llama8b-latency-bs1-$q.json" \
          ${PROFILE:+--profile}
      done
      python3 benchmarks/quant_ratio.py latency "$OUT/llama8b-latency-bs1-none.json" \
        "$OUT/llama8b-latency-bs1-gptq.json" 1.8 | tee -a "$summary" ;;
    # Issue 15's FP8 KV cache: its GPU tests (kvfp8-tests), then llama8b-mixed with the default cache and with FP8
    # (kvfp8-bench, the pair in one run); kvfp8 runs both (may not fit one 10-minute call: then run the two).
    kvfp8|kvfp8-tests) logged "fp8 KV tests" kvfp8-tests.log 420 '(passed|failed|error)' python3 -m pytest -q \
        -p no:cacheprovider tests/attention/test_triton_attention.py tests/attention/test_fp8_kv.py \
        tests/engine/test_cuda_engine.py -k "kv8 or kv-fp8 or kv-bf16 or fp8 or backend or split" ;;&
    kvfp8|kvfp8-bench)
      for kv in auto fp8; do
        logged "llama8b-mixed kv_cache_dtype=$kv" "kvfp8-llama-$kv.log" 280 '^pagellm ' "${BENCH[@]}" throughput \
          --workload llama8b-mixed --peer none --kv-cache-dtype "$kv" --output-json "$OUT/llama8b-mixed-kv-$kv.json"
      done
      python3 - "$OUT" >> "$summary" <<'PY' || echo "kvfp8 fp8/auto: missing results" >> "$summary"
import json, sys
a, f = (json.load(open(f"{sys.argv[1]}/llama8b-mixed-kv-{kv}.json"))["pagellm"] for kv in ("auto", "fp8"))
print(f"kvfp8 fp8/auto: KV blocks {f['num_blocks']}/{a['num_blocks']} = {f['num_blocks'] / a['num_blocks']:.2f}x "
      f"(target 2x), output tok/s {f['output_tokens_per_s']:.0f}/{a['output_tokens_per_s']:.0f} = "
      f"{f['output_tokens_per_s'] / a['output_tokens_per_s']:.3f}x (target >= 1)")
PY
      ;;
    # Issue 16's transformers fallback: its CUDA test (Triton attention under transformers' layers, tokens equal
    # to the CPU's), then qwen06b-nano (128 requests) through pagellm's Qwen3 and forced through the fallback, the
    # pair in one run. The fallback runs eagerly; expect it slower (a figure to report, not a target).
    fallback|fallback-tests) logged "fallback tests" fallback-tests.log 300 '(passed|failed|error)' python3 -m pytest \
        -q -p no:cacheprovider tests/models/test_transformers_fallback.py ;;&
    fallback|fallback-bench)
      for impl in pagellm transformers; do
        logged "qwen06b-nano model_impl=$impl" "fallback-qwen-$impl.log" 280 '^pagellm ' "${BENCH[@]}" throughput \
          --workload qwen06b-nano --num-prompts 128 --peer none --model-impl "$impl" \
          --output-json "$OUT/qwen06b-nano-impl-$impl.json"
      done
      python3 - "$OUT" >> "$summary" <<'PY' || echo "fallback/native: missing results" >> "$summary"
import json, sys
n, f = (json.load(open(f"{sys.argv[1]}/qwen06b-nano-impl-{i}.json"))["pagellm"] for i in ("pagellm", "transformers"))
print(f"fallback/native output tok/s: {f['output_tokens_per_s']:.0f}/{n['output_tokens_per_s']:.0f} = "
      f"{f['output_tokens_per_s'] / n['output_tokens_per_s']:.3f}x")
PY
      ;;
    # Issue 16's Mixture-of-Experts. moe-tests: the fused kernel against the torch path (many shapes, EP parts, a
    # CUDA graph), the MoE models on CUDA, then the kernel's time against the unfused loop. moe-bench: qwen3moe-mixed
    # (Qwen3-30B-A3B shape, dummy bf16, ~61 GB) with the transformers peer (its grouped_mm experts) in the same run.
    moe|moe-tests) logged "moe kernel tests" moe-tests.log 240 '(passed|failed|error)' python3 -m pytest -q \
        -p no:cacheprovider tests/layers/test_fused_moe.py tests/models/test_moe.py
      logged "moe kernel vs loop" moe-kernel.log 75 '^moe kernel' python3 benchmarks/moe_kernel.py \
        --out "$OUT/moe-kernel.json" ;;&
    # The peer runs the first 64 requests (one static batch) to stay inside one call; its tokens/s counts their
    # output tokens. pagellm's own figure is printed before the peer starts, so a cut-short peer leaves it.
    moe|moe-bench) logged "qwen3moe-mixed vs peer" moe-bench.log 330 '^(pagellm|transformers|ratio)' "${BENCH[@]}" \
        throughput --workload qwen3moe-mixed --peer hf --peer-requests 64 \
        --output-json "$OUT/qwen3moe-mixed-peer.json" ;;
    moe-ep)  # 2 GPUs: tensor parallel vs expert parallel, one run each, same call
      for mode in tp ep; do
        epflag=(); [ "$mode" = ep ] && epflag=(--enable-expert-parallel)
        logged "qwen3moe-mixed 2 GPUs $mode" "moe-$mode.log" 280 '^pagellm ' "${BENCH[@]}" throughput \
          --workload qwen3moe-mixed --peer none -tp 2 "${epflag[@]}" --output-json "$OUT/qwen3moe-mixed-$mode.json"
      done ;;
    # Issue 17's multi-LoRA: the Triton kernels against torch and the CUDA engine against the CPU engine (lora-tests),
    # then llama8b-mixed on the base model alone and with 8 random rank-16 adapters mixed in, both in one run
    # (lora-bench; target >= 0.8x output tokens/s).
    lora|lora-tests) logged "lora tests" lora-tests.log 420 '(passed|failed|error)' python3 -m pytest -q \
        -p no:cacheprovider tests/lora/test_triton_lora.py tests/lora/test_lora_cuda.py ;;&
    lora-kernel) logged "lora kernel configs" lora-kernel.log 200 '^lora kernel' python3 benchmarks/lora_kernel.py \
        --out "$OUT/lora-kernel.json" ;;
    lora|lora-bench) logged "llama8b-mixed lora" lora-bench.log 540 '^(base|lora)' "${BENCH[@]}" throughput \
        --workload llama8b-mixed --lora-adapters 8 --lora-rank 16 --output-json "$OUT/llama8b-mixed-lora.json" ;;
    # Issue 18's Qwen2-VL parts (not yet wired into the engine): the Triton rotary kernel under M-RoPE, the tower and
    # the model module (Triton paged attention) on CUDA against transformers on the CPU (mrope-tests); the tower at
    # Qwen2-VL-7B's shape against transformers' tower (sdpa) on the same random bf16 weights, and M-RoPE's cost
    # next to 1-D RoPE (mrope-bench).
    mrope|mrope-tests) logged "qwen2-vl parts tests (CUDA)" mrope-tests.log 300 '(passed|failed|error)' python3 -m \
        pytest -q -p no:cacheprovider tests/layers/test_mrope.py tests/models/test_qwen2_vl_vision.py \
        tests/models/test_qwen2_vl.py ;;&
    mrope|mrope-bench) logged "qwen2-vl tower + M-RoPE" mrope-bench.log 300 '^qwen2-vl' python3 \
        benchmarks/qwen2_vl_parts.py --out "$OUT/qwen2-vl-parts.json" ;;
    # Issue 18 part 2, images in chat (needs pillow there: carry its wheel if `import PIL` fails): the tiny LLaVA
    # and Qwen2-VL tests on CUDA (vision-tests; the server tests only where fastapi & co. import), then llava7b-image
    # (LLaVA-1.5-7B shape, dummy bf16 weights, 128 requests with one random image each) with the transformers peer
    # in the same run (vision-bench). Both under 5 minutes.
    vision|vision-tests)
      python3 -c "import PIL" 2>/dev/null || echo "vision: pillow is missing (pip install pillow)" | tee -a "$summary"
      vtests=(tests/multimodal)
      python3 -c "import fastapi, uvicorn, zmq, msgspec, openai" 2>/dev/null && vtests+=(tests/entrypoints/test_vision_server.py)
      logged "vision tests (CUDA)" vision-tests.log 240 '(passed|failed|error)' python3 -m pytest -q \
        -p no:cacheprovider "${vtests[@]}" ;;&
    vision|vision-bench) logged "llava7b-image vs peer" vision-bench.log 240 '^(pagellm|transformers|ratio)' \
        "${BENCH[@]}" throughput --workload llava7b-image --peer hf --output-json "$OUT/llava7b-image-peer.json" ;;
    w4-tests) logged "w4a16 kernel tests" w4-tests.log 480 '(passed|failed|error)' python3 -m pytest -q \
        -p no:cacheprovider tests/layers/test_quantization_cuda.py -k "w4a16 or gptq or awq" ;;
    ncu-gemv)  # Nsight Compute on the batch-1 W4A16 kernel at the 8B shapes (one launch of each, after compiling)
      ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout 240 "${ncu:-ncu}" --clock-control none --kernel-name regex:w4a16 --launch-skip 4 --launch-count 4 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section SchedulerStats --section WarpStateStats --section InstructionStats --section SourceCounters \
        python3 benchmarks/w4a16_ncu.py > "$OUT/ncu-gemv.log" 2>&1
      echo "ncu-gemv: rc $?, $(grep -cE 'w4a16' "$OUT/ncu-gemv.log") lines naming w4a16" >> "$summary"
      grep -E "(w4a16_|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Block Size|Grid Size|Issued Ipc|No Eligible|Warp Cycles Per Issued)" \
        "$OUT/ncu-gemv.log" | head -80 ;;
    w4-gemv-tests) logged "w4a16 batch-1 tests" w4-gemv-tests.log 300 '(passed|failed|error)' python3 -m pytest -q \
        -p no:cacheprovider tests/layers/test_quantization_cuda.py \
        -k "gemv or deterministic or cuda_graph or (matches_dequantize and -1])" ;;
    tune|tune-w4a16|tune-moe|tune-w4a16-m1|tune-w4a16-m128)  # both kernels 125 s each; one kernel alone 270 s (past it: "not run")
      kernels=w4a16,moe budget=125 only=()
      case "$what" in tune-w4a16) kernels=w4a16 budget=270 ;; tune-moe) kernels=moe budget=270 ;;
        tune-w4a16-m1) kernels=w4a16 budget=150 only=(--w4a16-m 1) ;;
        tune-w4a16-m128) kernels=w4a16 budget=120 only=(--w4a16-m 128) ;; esac
      logged "kernel tuning ($kernels)" "$what.log" 295 '^(tune|w4a16 )' python3 benchmarks/tune_kernels.py \
        --out "$OUT" --kernels "$kernels" --budget-s "$budget" "${only[@]}" ;;
    # bake: write a tune part's winners ($OUT/tuned-*.json) into this copy's tables, so that later parts of the same
    # call run them (e.g. tune-w4a16 bake quant-w4); bake them here too from the returned JSON before committing.
    bake) python3 benchmarks/tune_kernels.py --bake "$OUT" | tee -a "$summary" ;;
    # qwen2vl-image: Qwen2-VL-7B shape (M-RoPE, the 675M-parameter tower), dummy bf16 weights, 128 requests with one
    # random 300-640 px image each (hundreds of image tokens apiece), with the transformers peer in the same run.
    qwen2vl-bench) logged "qwen2vl-image vs peer" qwen2vl-bench.log 290 '^(pagellm|transformers|ratio)' \
        "${BENCH[@]}" throughput --workload qwen2vl-image --peer hf --output-json "$OUT/qwen2vl-image-peer.json" ;;
    host) logged "host time per step $tag" "host-$tag.log" 400 '^(decode +256|mixed +256|workload)' python3 benchmarks/profile_steps.py \
            --workload llama8b-mixed --label "$tag" --out "$OUT" ;;
  esac
done
echo "===== summary"; cat "$summary"
