#!/usr/bin/env bash
# Utility comparison of the data path (issue 3; FairFed for issue 6): the same small CNN on the same non-IID
# race split, trained centrally on the pooled hospital shards and federated with each strategy, with equal
# total epochs (whole local epochs, no step cap). Prints one line per run from each results directory.
#
#   bench/utility.sh [OUT_DIR]      (env: LIMIT=6000 ROUNDS=3 SEED=0 STRATEGIES="fedavg fedprox scaffold fairfed")
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/utility}
limit=${LIMIT:-6000}
rounds=${ROUNDS:-3}
seed=${SEED:-0}
strategies=${STRATEGIES:-fedavg fedprox scaffold fairfed}
bin=${CADUCEUS_BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}/caduceus
common=(--limit "$limit" --rounds "$rounds" --local-epochs 1 --local-steps 0 --seed "$seed" --overwrite)
mkdir -p "$out"
runs=()
start=$(date +%s)
"$bin" simulate "${common[@]}" --centralised --results "$out/centralised" >"$out/centralised.log" 2>&1
runs+=(centralised)
for s in $strategies; do
  "$bin" simulate "${common[@]}" --strategy "$s" --results "$out/$s" >"$out/$s.log" 2>&1
  runs+=("$s")
done
python3 - "$out" "${runs[@]}" <<'PY'
import json, sys, os
out, runs = sys.argv[1], sys.argv[2:]
def eod(c):
    # fairlearn's equalized odds difference over race groups with at least 30 examples (the fairness
    # crate's DEFAULT_MIN_GROUP_SIZE), from the held-out test set's confusion counts
    groups = c.get("attributes", {}).get("race", {})
    tpr, fpr = [], []
    for g, k in groups.items():
        tp, fp, tn, fn = (k.get(x, 0) for x in ("tp", "fp", "tn", "fn"))
        if tp + fp + tn + fn < 30: continue
        if tp + fn: tpr.append(tp / (tp + fn))
        if fp + tn: fpr.append(fp / (fp + tn))
    if not tpr or not fpr: return None
    return max(max(tpr) - min(tpr), max(fpr) - min(fpr))
print(f"{'run':<12} {'test acc':>9} {'race EOD (test)':>16} {'val acc by round':<40} seconds")
for r in runs:
    rounds = json.load(open(os.path.join(out, r, "rounds.json")))
    rounds = rounds.get("rounds", rounds) if isinstance(rounds, dict) else rounds
    last = rounds[-1]
    tc = last.get("test_counts") or last.get("extra", {}).get("test_counts") or {}
    e = eod(tc)
    accs = " ".join(f"{x['accuracy']:.3f}" for x in rounds if x.get("accuracy") is not None)
    secs = sum(x.get("round_seconds", 0) or 0 for x in rounds)
    es = f"{e:.4f}" if e is not None else "-"
    print(f"{r:<12} {last.get('test_accuracy', float('nan')):>9.4f} {es:>16} {accs:<40} {secs:.0f}")
PY
echo "utility: $(( $(date +%s) - start )) s in all; results under $out"
