#!/usr/bin/env bash
# Training throughput of the trainer against PyTorch (issue 9), in one invocation: for each model,
# images/s of forward + backward + optimiser step on real UTKFace 64x64 images, batch 64, AdamW,
# our `throughput` example and bench/torch_throughput.py alternating for ROUNDS rounds on the same
# threads; prints each run and the ratio of the medians (ours / PyTorch). Goal: >= 0.8.
#
#   bench/training.sh <throughput binary>      (env: BENCH_IMAGES, BENCH_STEPS, ROUNDS, ARCHS, CADUCEUS_DATA_DIR)
set -euo pipefail
bin=${1:?usage: bench/training.sh path/to/throughput}
here=$(cd "$(dirname "$0")" && pwd)
images=${BENCH_IMAGES:-1024}
steps=${BENCH_STEPS:-24}
rounds=${ROUNDS:-3}
archs=${ARCHS:-small-cnn,resnet8,mobilenet}
threads=${RAYON_NUM_THREADS:-$(nproc)}
data=${CADUCEUS_DATA_DIR:-$here/../../shared/data}/utkface-64
[[ -d $data ]] || { echo "ERROR: no UTKFace images at $data (set CADUCEUS_DATA_DIR)" >&2; exit 2; }
python=$("$here/../tools/torch/setup.sh")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq "$rounds"); do
  RAYON_NUM_THREADS=$threads "$bin" --data-dir "$data" --images "$images" --steps "$steps" --batch 64 \
    --archs "$archs" | tee -a "$out/ours"
  "$python" "$here/torch_throughput.py" --data-dir "$data" --images "$images" --steps "$steps" --batch 64 \
    --archs "$archs" --threads "$threads" | tee -a "$out/torch"
done
echo
echo "model       caduceus (median)  PyTorch (median)  ratio   (goal >= 0.8; $rounds rounds, $steps steps of 64, $threads threads)"
for arch in ${archs//,/ }; do
  med() { awk -v a="$arch" '$1 == a { for (i = 1; i < NF; i++) if ($(i+1) == "images/s") print $i }' "$1" \
    | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
  ours=$(med "$out/ours") theirs=$(med "$out/torch")
  awk -v a="$arch" -v o="$ours" -v t="$theirs" 'BEGIN { printf "%-11s %10.1f images/s %10.1f images/s  %5.2fx\n", a, o, t, o / t }'
done
