#!/usr/bin/env bash
# Several `repae bench reproduce` invocations side by side on one machine (issue 21's probes on a lent GPU):
# each on its own set of CPU cores (taskset; its --jobs is that many runs at once, one thread each), all
# sharing the GPU, within one time budget; then the small records of every run are copied to OUT.
#
#   OUT=DIR SPEC=FILE REPAE_CACHE=DIR benchmarks/gpu_reproduce_probes.sh
#
# SPEC: one probe per line, `NAME CORES ARGS...`: ARGS are `repae bench reproduce`'s overrides and flags
# without --dir and --jobs (e.g. `vlr 3 optim_vae.lr=1e-3 --arms repae --seeds 0 1 2 --cfg-scales`);
# # starts a comment. The cores of all probes together must not exceed the machine's.
# REPAE_CACHE: the toy world's cache. A world trained elsewhere can be carried without its rendered images
# (train.npz, heldout.npz: 90 MB): they are rendered again here (numpy, seeded) and their sha256 recorded in
# OUT/world.json, to compare with the machine the models were trained on.
# PROBE_BUDGET_S (default 480): each invocation is stopped (SIGTERM: the runner stops its runs) after this
# many seconds from the start of the script; a stopped run leaves what it measured.
# WORLD_OVERRIDES: the toy preset's overrides that name the world (toy.*), space-separated, when the probes give any.
# PYTHON (default python), WORK (default /tmp/repae-probes): where the runs are written.
# OUT gets, per probe: results.json (when the invocation finished), runs/*/{reproduce-metrics,summary}.json,
# runs/*/metrics.jsonl, the invocation's output and each run's log tail; plus gpu.csv (nvidia-smi every 5 s)
# and world.json.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${OUT:?OUT: where the records go}
SPEC_FILE=${SPEC:?SPEC: the probes, one per line}
WORK=${WORK:-/tmp/repae-probes}
BUDGET=${PROBE_BUDGET_S:-480}
: "${REPAE_CACHE:?REPAE_CACHE: the toy world cache}"
export REPAE_CACHE
START=$(date +%s)
mkdir -p "$OUT_DIR" "$WORK"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
$PY -c 'import repae.cli' 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$OUT_DIR/gpu.csv" 2>&1 &
  SMI=$!
fi

# The world (images rendered if missing, every model loaded or built) once, before the probes read it
# side by side.
# shellcheck disable=SC2086  # the overrides are words
$PY - "$OUT_DIR/world.json" ${WORLD_OVERRIDES:-} <<'EOF' || { echo "world build failed" >&2; exit 1; }
import hashlib, json, sys, time
import numpy as np
from repae.config import load_config
from repae.reproduce.judges import toy_judges
from repae.toyworld import cache_dir_for
start = time.perf_counter()
cfg = load_config("toy", [], sys.argv[2:])
toy_judges(cfg)
cache = cache_dir_for(cfg.toy, 0)
record = {"seconds": round(time.perf_counter() - start, 1), "cache": str(cache)}
for name in ("train.npz", "heldout.npz"):
    with np.load(cache / name) as pool:
        record[name] = {k: hashlib.sha256(np.ascontiguousarray(pool[k]).tobytes()).hexdigest() for k in pool.files}
json.dump(record, open(sys.argv[1], "w"), indent=2)
print(json.dumps(record))
EOF

NCORES=$($PY -c 'import os; print(len(os.sched_getaffinity(0)))')
PIN=taskset
command -v taskset > /dev/null || { PIN=""; echo "no taskset: probes share every core" | tee -a "$OUT_DIR/probes.txt"; }
next=0
pids=()
names=()
while read -r name cores args; do
  case "$name" in ''|\#*) continue ;; esac
  if [ $((next + cores)) -gt "$NCORES" ]; then
    echo "$name: $cores cores wanted, $((NCORES - next)) left of $NCORES: not started" | tee -a "$OUT_DIR/probes.txt"
    continue
  fi
  left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 1 ]; then  # `timeout 0` would mean no limit at all
    echo "$name: the budget of $BUDGET s is spent: not started" | tee -a "$OUT_DIR/probes.txt"
    continue
  fi
  mkdir -p "$WORK/$name" "$OUT_DIR/$name"
  # shellcheck disable=SC2086  # ARGS are words
  ${PIN:+$PIN -c "$next-$((next + cores - 1))"} timeout -s TERM -k 20 "$left" \
    $PY -m repae.cli bench reproduce $args --jobs "$cores" --dir "$WORK/$name" \
    > "$OUT_DIR/$name/output.txt" 2>&1 &
  pids+=($!)
  names+=("$name")
  echo "$name: cores $next-$((next + cores - 1)), $args" | tee -a "$OUT_DIR/probes.txt"
  next=$((next + cores))
done < "$SPEC_FILE"

for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  echo "${names[$i]}: exit $? after $(($(date +%s) - START)) s" | tee -a "$OUT_DIR/probes.txt"
done
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null

for name in "${names[@]}"; do
  src="$WORK/$name"
  [ -f "$src/results.json" ] && cp "$src/results.json" "$OUT_DIR/$name/"
  for run in "$src"/runs/*/; do
    [ -d "$run" ] || continue
    dst="$OUT_DIR/$name/runs/$(basename "$run")"
    mkdir -p "$dst"
    for f in reproduce-metrics.json summary.json metrics.jsonl; do
      [ -f "$run/$f" ] && cp "$run/$f" "$dst/"
    done
  done
  for log in "$src"/logs/*.log; do
    [ -f "$log" ] && tail -n 30 "$log" > "$OUT_DIR/$name/$(basename "$log")"
  done
done
echo "all probes: $(($(date +%s) - START)) s" | tee -a "$OUT_DIR/probes.txt"
