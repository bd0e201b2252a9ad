#!/usr/bin/env bash
# One batched GPU session: GPU tests and benchmarks, everything logged under $OUT (default ./gpu-logs).
# Usage, from the repo root on the GPU machine:
#   bash bench/run_gpu.sh tests bench:hw bench:nf4 bench:rope ...
#   steps: tests[:<pytest args>]  bench:<name>  (python -m bench.<name>)  unsloth:<name> (same, with unsloth importable)
# Peers travel as wheels in .whl/ (see ../shared/PEERS.md); without them the peers are reported as missing.
set -u
OUT=${OUT:-gpu-logs}
# $OUT gets summary.txt, logs/*.log and all.tgz (logs/ and results/, which can hold more files than the
# device tool brings back one by one).
W=$(mktemp -d)
mkdir -p "$OUT"
mkdir -p "$W/logs" "$W/results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f .whl/install.sh ] && source .whl/install.sh
export PYTHONPATH="$PWD:$PYTHONPATH"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$W/logs/env.txt" 2>&1
summary="$OUT/summary.txt"; : > "$summary"
for step in "$@"; do
  start=$(date +%s)
  case "$step" in
    tests*)
      args="${step#tests}"; args="${args#:}"
      timeout 420 python3 -m pytest -m gpu -q -p no:cacheprovider -rfEP ${args:-tests} > "$W/logs/gpu-tests.log" 2>&1
      rc=$?; echo "tests rc=$rc $(tail -1 "$W/logs/gpu-tests.log")" >> "$summary" ;;
    bench:*)
      name="${step#bench:}"
      timeout 300 python3 -m "bench.$name" > "$W/logs/bench-$name.log" 2>&1
      rc=$?; echo "bench $name rc=$rc" >> "$summary" ;;
    unsloth:*)
      name="${step#unsloth:}"
      ( PEERS_UNSLOTH=1 source .whl/install.sh 2>/dev/null; export PYTHONPATH="$PWD:$PYTHONPATH"; \
        timeout 300 python3 -m "bench.$name" --only-unsloth ) > "$W/logs/unsloth-$name.log" 2>&1
      rc=$?; echo "unsloth $name rc=$rc" >> "$summary" ;;
    *) echo "unknown step $step" >> "$summary" ;;
  esac
  echo "  ($(( $(date +%s) - start )) s)" >> "$summary"
done
cp bench/results/*.md bench/results/.*-rows-*.json "$W/results/" 2>/dev/null  # row caches too: merge them locally
tar czf "$OUT/all.tgz" -C "$W" logs results
cp -r "$W/logs" "$OUT/"
cat "$summary"
