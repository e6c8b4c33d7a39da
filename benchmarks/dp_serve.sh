#!/usr/bin/env bash
# Data parallelism behind one server, as issue 12 measures it: `pagellm serve` on the llama8b-mixed shape with
# dummy weights at each --data-parallel-size given, then `pagellm bench serve` (rate inf), results under $OUT.
#   benchmarks/dp_serve.sh [NUM_PROMPTS] [DP ...]      e.g. benchmarks/dp_serve.sh 768 1 2
set -u
OUT=${OUT:-/tmp/dp-serve}
mkdir -p "$OUT"
NUM=${1:-768}
shift || true
SIZES=("${@:-1 2}")
mkdir -p "$OUT/model"
MODEL=$(python3 -c "from pagellm.bench.workloads import WORKLOADS, write_dummy_model
print(write_dummy_model(WORKLOADS['llama8b-mixed'].shape, '$OUT/model'))")
for dp in ${SIZES[@]}; do
  port=$((8100 + dp))
  python3 -m pagellm.entrypoints.cli serve "$MODEL" --load-format dummy --skip-tokenizer-init \
    --data-parallel-size "$dp" --port "$port" > "$OUT/serve-dp$dp.log" 2>&1 &
  server=$!
  ok=0
  for _ in $(seq 1 300); do
    if python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$port/health').status != 200)" 2>/dev/null; then ok=1; break; fi
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  if [ $ok = 1 ]; then
    python3 -m pagellm.entrypoints.cli bench serve --base-url "http://127.0.0.1:$port" --workload llama8b-mixed \
      --num-prompts "$NUM" --request-rate inf --tokenizer-model "$MODEL" --output-json "$OUT/h200x2-dp$dp-serve.json" \
      > "$OUT/bench-dp$dp.log" 2>&1
    echo "dp=$dp: $(grep -iE '^(requests|output throughput|tpot)' "$OUT/bench-dp$dp.log" | tr '\n' ' ')"
  else
    echo "dp=$dp: the server did not start; see serve-dp$dp.log"; tail -5 "$OUT/serve-dp$dp.log"
  fi
  kill -TERM $server 2>/dev/null; wait $server 2>/dev/null
done
