#!/usr/bin/env bash
# Scores the v2 recipe candidates beside the baselines and v1 in one `microsnoop benchmark` run per set
# (issue 14). Candidates are run folders outside the repo; the embedding cache in REPORT is shared with
# `python benchmarks/refresh.py --report-dir REPORT`, so the docs page reuses these vectors.
#   bash benchmarks/v2_candidates.sh /work/runs /work/bench/all [set ...]
set -euo pipefail
RUNS=${1:?run folders parent}; REPORT=${2:?report dir}; shift 2
SETS=("$@")
[ ${#SETS[@]} -gt 0 ] || SETS=(mitocheck_phenotypes_dev bbbc021_dmso_vs_cycloheximide bbbc013_translocation yeast_pci)
DATA=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/benchmarks
models=(-m cellpose-encoder -m imagenet-effnet-lite0 -m handcrafted -m microsnoop-unet-v1 -m "microsnoop-unet-v1:levels=all")
for run in distill_v2 mae_aug mae_inv; do
  ckpt="$RUNS/$run/model.safetensors"
  [ -f "$ckpt" ] || { echo "skip $run (no $ckpt)"; continue; }
  case $run in distill_*) models+=(-m "$ckpt") ;; *) models+=(-m "$ckpt:levels=all") ;; esac
done
for s in "${SETS[@]}"; do
  microsnoop benchmark "$DATA/$s" "${models[@]}" -o "$REPORT" --plot none --precision fp32
  cp "$REPORT/report.json" "$REPORT/report_$s.json"
done
