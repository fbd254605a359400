#!/usr/bin/env bash
# Every measurement of issue 19 on one GPU, most important first, within SUITE_BUDGET_S (default 8 minutes),
# one JSON file per figure. The first six steps hold every figure the issue asks for (loop against loop, the
# compiled loop and its bare step, sampling at 32 and 128, the FID protocol) but sampling at batch 512, the last
# step; on one H200 they should take about 475 s (docs/benchmarks/README.md: an estimate from the 2026-12-04 run,
# not yet measured).
#
#   REPAE_REFERENCE=/path/to/REPA-E benchmarks/gpu_suite.sh          # on a GPU machine
#   benchmarks/gpu_suite.sh --cpu-smoke                              # the same steps, toy-sized, on a CPU
#
# Environment:
#   OUT               where the JSON files go (default docs/benchmarks/gpu-<date>/)
#   REPAE_REFERENCE   a checkout of End2End-Diffusion/REPA-E; unset: the reference runs are "skipped"
#   SUITE_BUDGET_S    seconds for all measurements together (default 480); a step that would start
#                     with under 30 s left (5 s with --cpu-smoke) is recorded as skipped, each step is
#                     cut at its own cap
#   SUITE_STEPS       comma-separated step names to run (default: all); the others are recorded "skipped"
#   PYTHON            the interpreter (default python); REPAE_BENCH_WORK scratch (default /tmp/repae-gpu-suite)
#
# Steps, most important first (a step cut by the budget leaves the later ones "skipped"):
#   loop_eager_b16, ref_eager_b16            our training loop (repae bench loop) against the reference's
#       (benchmarks/reference_step.py): same batch, 12 steps, first 2 untimed
#   loop_compile_b16                         our loop with train.compile=true, then in the same process
#       `repae bench step`'s figure on its trainables (--step-iters: the bare step's fraction of the bf16 matmul
#       peak), which so reuses the loop's compiled graphs (a `bench step` of its own took 91 s more on the H200)
#   sample_b32, sample_b128                  repae bench sample: ODE-50 without CFG, SDE-250 with CFG 4 (on
#       every step: the strict figure), eager; at 128 also, in the same process, SDE-250 with the published REPA-E
#       SiT-XL protocol (CFG 2.2 on t in [0, 0.65]: --modes sde-250:2.2:0-0.65): the FID-50K wall-time estimate
#   sample_b128_compile                      sample_b128 with sample.compile=true, all three in one process (one
#       compile; the protocol was a step of its own, sample_fid_protocol, that compiled again)
#   toy_world_build                          issue 21: the toy world (teacher, VAE, evaluator) built from
#       nothing cached on the default device (benchmarks/world_build.py): where each part trained, how long
#   loop_eager_b16_slowkernels               ours with train.tf32=false train.cudnn_benchmark=false: what
#       TF32 and cuDNN's benchmark mode (both on by default on a GPU) give
#   loop_eager_b16_regnhwc                   our eager loop with train.regulariser_channels_last=true (LPIPS
#       and the discriminator in NHWC, the VAE in NCHW)
#   loop_eager_b32, ref_eager_b32, loop_eager_b32_regnhwc, loop_compile_b32   the same at batch 32 (the
#       paper's per-GPU batch: 256 over 8 GPUs)
#   loop_compile_b32_nhwc                    loop_compile_b32 (and its bare step) with the VAE in NHWC
#       (train.channels_last=true; LPIPS and the discriminator follow). Eager, NHWC lost on an H100 to the
#       GroupNorm and elementwise ops between the convolutions, which compile fuses; cuDNN's tensor-core
#       convolutions work in NHWC
#   profile_eager_b32                        the eager training loop at batch 32 under torch.profiler
#       (benchmarks/step_profile.py --loop, after loop_eager_b32): ops and kernels by device time, the device's
#       idle share of the loop's step and its gaps between kernels by launching op, each host sync by its line
#   profile_compile_b32                      the same with train.compile=true (after loop_compile_b32, whose
#       compiled graphs it reuses from inductor's cache): each compiled graph's kernels among the ops
#   loop_compile_b16_autotune, loop_compile_b32_autotune   the compiled loop with
#       train.compile_mode=max-autotune-no-cudagraphs (inductor times its own matmul/conv kernels per shape)
#   sample_b128_compile_cudagraphs           compiled sampling with sample.compile_mode=reduce-overhead (each
#       compiled region replayed as a CUDA graph)
#   sample_b512                              ODE-50 without CFG at batch 512, eager, with its peak memory: whether
#       images/s still rise with the batch (32 -> 128 gave +7% on the H200) and how near the memory limit that is
#   fid50k_estimate                          50000 / (SDE-250 + CFG images/s), from the fastest measurement
#       that used the published protocol, else the fastest SDE + CFG one
#   summary.json + a printed table; env.json: machine, torch, commit. Logs in logs/.
#   all-files.tar.gz: everything above in one archive, written last (for a machine that returns few files)
# Installs only what is missing and never another torch: a missing repae dependency or reference
# dependency is pip-installed with torch pinned to the installed version. No network besides pip.
set -u
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --cpu-smoke|--dry-run) MODE=cpu ;;
  "") ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
OUT_DIR=${OUT:-docs/benchmarks/gpu-$(date +%Y-%m-%d)}
WORK=${REPAE_BENCH_WORK:-/tmp/repae-gpu-suite}
BUDGET=${SUITE_BUDGET_S:-480}
MIN_LEFT=30
[ "$MODE" = cpu ] && MIN_LEFT=5
mkdir -p "$OUT_DIR/logs" "$WORK"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
START=$(date +%s)
STATUS="$OUT_DIR/logs/status.tsv"
: > "$STATUS"

# ------------------------------------------------------------------ what is needed, only if missing
if ! $PY -c 'import torch' 2>/dev/null; then
  echo "no torch in $PY: installing the default build (pip)"
  $PY -m pip install torch || { echo "could not install torch" >&2; exit 1; }
fi
TORCH_VERSION=$($PY -c 'import torch; print(torch.__version__)')
PIN="$WORK/torch-pin.txt"
echo "torch==$TORCH_VERSION" > "$PIN"   # pip -c: whatever else is installed, this torch stays
if ! $PY -c 'import repae.cli' 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  if ! $PY -c 'import repae.cli' 2>/dev/null; then
    echo "installing repae (torch $TORCH_VERSION kept)"
    $PY -m pip install -c "$PIN" -e . > "$OUT_DIR/logs/pip-repae.log" 2>&1 \
      || { echo "pip install -e . failed: $OUT_DIR/logs/pip-repae.log" >&2; exit 1; }
  fi
fi
if [ "$MODE" = gpu ] && ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "no CUDA device visible to torch $TORCH_VERSION; for a CPU check of this script use --cpu-smoke" >&2
  exit 1
fi
REF_SKIP=""
if [ "$MODE" = cpu ]; then
  REF_SKIP="cpu smoke: benchmarks/reference_step.py needs CUDA"
elif [ -z "${REPAE_REFERENCE:-}" ]; then
  REF_SKIP="REPAE_REFERENCE is not set (a checkout of End2End-Diffusion/REPA-E)"
elif [ ! -f "$REPAE_REFERENCE/train_repae.py" ]; then
  REF_SKIP="REPAE_REFERENCE=$REPAE_REFERENCE has no train_repae.py"
elif ! $PY -c 'import timm, torchvision, accelerate, einops, h5py' 2>/dev/null; then
  echo "installing the reference's dependencies (torch $TORCH_VERSION kept)"
  $PY -m pip install -c "$PIN" timm torchvision accelerate einops h5py omegaconf \
    > "$OUT_DIR/logs/pip-reference.log" 2>&1 \
    || REF_SKIP="its dependencies (timm torchvision accelerate einops h5py) did not install with torch $TORCH_VERSION: logs/pip-reference.log"
fi

$PY - "$OUT_DIR/env.json" "$MODE" <<'EOF'
import json, subprocess, sys, datetime, torch
env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "mode": sys.argv[2], "torch": torch.__version__,
       "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
for key, cmd in (("commit", ["git", "rev-parse", "HEAD"]),
                 ("gpu", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])):
    try:
        env[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        pass
json.dump(env, open(sys.argv[1], "w"), indent=2)
EOF

# ------------------------------------------------------------------ one step = one JSON file
record() {  # record NAME STATUS REASON: a status JSON when the command wrote none
  local name=$1 status=$2 reason=$3
  echo -e "$name\t$status" >> "$STATUS"
  [ "$status" = ok ] && return
  $PY - "$OUT_DIR/$name.json" "$status" "$reason" "$OUT_DIR/logs/$name.log" <<'EOF'
import json, os, sys
path, status, reason, log = sys.argv[1:5]
tail = open(log, errors="replace").read()[-2000:] if os.path.exists(log) else ""
json.dump({"status": status, "reason": reason, "log_tail": tail}, open(path, "w"), indent=2)
EOF
}

selected() {  # selected NAME: whether SUITE_STEPS (unset: every step) names it
  [ -z "${SUITE_STEPS:-}" ] && return 0
  case ",${SUITE_STEPS// /}," in *",$1,"*) return 0 ;; esac
  return 1
}

run_step() {  # run_step NAME CAP_SECONDS COMMAND...: runs with --out NAME.json under min(cap, budget left)
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  rm -f "$OUT_DIR/$name.json"
  if ! selected "$name"; then
    record "$name" skipped "not in SUITE_STEPS"; return
  fi
  if [ "$left" -lt "$MIN_LEFT" ]; then
    record "$name" skipped "suite budget of ${BUDGET}s spent (SUITE_BUDGET_S)"; return
  fi
  local limit=$(( cap < left ? cap : left ))
  echo "[$(( $(date +%s) - START ))s] $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" --out "$OUT_DIR/$name.json" > "$OUT_DIR/logs/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ] && [ -s "$OUT_DIR/$name.json" ]; then
    record "$name" ok ""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" timeout "cut after ${limit}s"
  elif grep -q "out of memory" "$OUT_DIR/logs/$name.log" 2>/dev/null; then
    record "$name" out_of_memory "CUDA out of memory (rc $rc)"
  else
    record "$name" failed "exit status $rc: logs/$name.log"
  fi
}

ref_step() {  # ref_step NAME CAP BATCH
  if ! selected "$1"; then record "$1" skipped "not in SUITE_STEPS"; return; fi
  if [ -n "$REF_SKIP" ]; then record "$1" skipped "$REF_SKIP"; return; fi
  run_step "$1" "$2" $PY benchmarks/reference_step.py --ref-dir "$REPAE_REFERENCE" --work "$WORK/reference" \
    --batch "$3" --steps 12
}

if [ "$MODE" = gpu ]; then
  PRESET=(--preset sit-xl2-f8d4); SIZE=(); LOOP=(--steps 12 --warmup 2 --iters 5); COMPILE=train.compile=true
  B16=16; B32=32; S32=32; S128=128; S512=512; MODES=(ode-50:1 sde-250:4); FID_MODE=(sde-250:2.2:0-0.65); BARE=(--step-iters 3)
  PROFILE=(--steps 3 --warmup 3)
  WORLD=()  # the toy preset's world, as `repae train` builds it
else  # toy-sized: checks the plumbing, measures nothing of interest
  PRESET=(--preset toy)
  SIZE=(model.depth=2 model.hidden_size=48 model.num_heads=2 model.encoder_depth=1 model.projector_dim=64
        vae.ch=32 "vae.ch_mult=[1,2,2]" train.num_threads=1)
  LOOP=(--steps 3 --warmup 1 --iters 1); COMPILE=train.compile=false  # a cold CPU compile costs 10-30 s a region
  B16=2; B32=4; S32=2; S128=4; S512=8; MODES=(ode-4:1 sde-6:4); FID_MODE=(sde-6:2.2:0-0.65); BARE=(--step-iters 1)
  PROFILE=(--steps 1 --warmup 1)
  WORLD=(toy.train_size=40 toy.heldout_size=20 toy.teacher_steps=1 toy.vae_steps=1 toy.batch_size=8
         toy.vae_batch_size=4)
fi
BENCH=($PY -m repae.cli bench)
DATA=(--data-dir "$WORK/data")

LOOP16=("${BENCH[@]}" loop "${PRESET[@]}" "${SIZE[@]}" train.global_batch_size=$B16 "${LOOP[@]}" "${DATA[@]}")
LOOP32=("${BENCH[@]}" loop "${PRESET[@]}" "${SIZE[@]}" train.global_batch_size=$B32 "${LOOP[@]}" "${DATA[@]}")
SAMPLE=("${BENCH[@]}" sample "${PRESET[@]}" "${SIZE[@]}")
# the options first: step_profile.py takes its overrides as one run of positionals
PROFILE32=($PY benchmarks/step_profile.py --loop "${DATA[@]}" "${PROFILE[@]}" "${PRESET[@]}" "${SIZE[@]}"
           train.global_batch_size=$B32)
run_step loop_eager_b16 120 "${LOOP16[@]}" train.compile=false  # compile is on by default on a GPU
ref_step ref_eager_b16 150 $B16
run_step loop_compile_b16 240 "${LOOP16[@]}" $COMPILE --iters 0 "${BARE[@]}"
run_step sample_b32 90 "${SAMPLE[@]}" --samples $S32 --modes "${MODES[@]}"
run_step sample_b128 210 "${SAMPLE[@]}" --samples $S128 --modes "${MODES[@]}" "${FID_MODE[@]}"
run_step sample_b128_compile 300 "${SAMPLE[@]}" sample.compile=true --samples $S128 --modes "${MODES[@]}" "${FID_MODE[@]}"
run_step toy_world_build 150 $PY benchmarks/world_build.py --cache "$WORK/toyworld-$(date +%s%N)" "${WORLD[@]}"
run_step loop_eager_b16_slowkernels 90 "${LOOP16[@]}" train.compile=false train.tf32=false train.cudnn_benchmark=false --iters 0
run_step loop_eager_b16_regnhwc 120 "${LOOP16[@]}" train.compile=false train.regulariser_channels_last=true --iters 0
run_step loop_eager_b32 120 "${LOOP32[@]}" train.compile=false
run_step profile_eager_b32 90 "${PROFILE32[@]}" train.compile=false
ref_step ref_eager_b32 150 $B32
run_step loop_eager_b32_regnhwc 120 "${LOOP32[@]}" train.compile=false train.regulariser_channels_last=true
run_step loop_compile_b32 240 "${LOOP32[@]}" $COMPILE --iters 0 "${BARE[@]}"
run_step loop_compile_b32_nhwc 240 "${LOOP32[@]}" $COMPILE train.channels_last=true --iters 0 "${BARE[@]}"
run_step profile_compile_b32 150 "${PROFILE32[@]}" $COMPILE
AUTOTUNE=train.compile_mode=max-autotune-no-cudagraphs  # inert in the CPU smoke (no compile there)
run_step loop_compile_b16_autotune 420 "${LOOP16[@]}" $COMPILE $AUTOTUNE --iters 0
run_step loop_compile_b32_autotune 420 "${LOOP32[@]}" $COMPILE $AUTOTUNE --iters 0
run_step sample_b128_compile_cudagraphs 300 "${SAMPLE[@]}" sample.compile=true sample.compile_mode=reduce-overhead \
  --samples $S128 --modes "${MODES[@]}" "${FID_MODE[@]}"
run_step sample_b512 150 "${SAMPLE[@]}" --samples $S512 --modes "${MODES[0]}"  # ODE-50 alone: SDE-250 + CFG ~4 min

# ------------------------------------------------------------------ FID-50K estimate and the summary
$PY - "$OUT_DIR" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
from pathlib import Path

out, wall = Path(sys.argv[1]), int(sys.argv[2])
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {"status": "missing"}

fid = {"status": "skipped", "reason": "no SDE-250 + CFG measurement"}
candidates = []  # (published protocol?, images/s, name, key, guidance interval, result)
for name in ("sample_b128_compile_cudagraphs", "sample_b128_compile", "sample_b128", "sample_b32"):
    r = load(name)
    for key, ips in r.get("images_per_s", {}).items():
        if key.startswith("sde-") and " cfg 1 " not in key + " ":  # guided: not "cfg 1", nor "cfg 1 interval ..."
            own = key.partition(" interval ")[2]  # bench sample's key for a mode with its own interval
            interval = [float(v) for v in own.split("-")] if own else r.get("guidance_interval")
            protocol = key.startswith("sde-250 cfg 2.2") and interval == [0.0, 0.65]
            candidates.append((protocol, ips, name, key, interval, r))
if candidates:
    protocol, ips, name, key, interval, r = max(candidates, key=lambda c: (c[0], c[1]))
    fid = {"status": "ok", "from": f"{name}.json", "sampler": key, "samples_per_batch": r["samples"],
           "published_protocol": protocol, "guidance_interval": interval, "compile": r.get("compile"),
           "images_per_s": ips, "seconds": 50000 / ips, "hours": 50000 / ips / 3600,
           "counts": "sampling + VAE decode of 50,000 images on this one device; Inception features "
                     "(repae bench evaluate) and file writing not included"}
(out / "fid50k_estimate.json").write_text(json.dumps(fid, indent=2))

rows, summary = [], {"suite_wall_seconds": wall, "steps": {}}
for line in (out / "logs" / "status.tsv").read_text().splitlines():
    name, status = line.split("\t")
    r = load(name)
    entry = {"status": status}
    if status == "ok":
        if "world_build_seconds" in r:  # benchmarks/world_build.py
            entry.update({k: v for k, v in r.items() if k.endswith(("_seconds", "_device", "_accuracy", "_psnr_db"))})
        elif "top_ops" in r:  # benchmarks/step_profile.py
            entry.update({k: r.get(k) for k in ("loop", "step_seconds", "device_idle_share", "host_syncs_per_step")})
            entry["device_gap_seconds_per_step"] = (r.get("device_gaps") or {}).get("gap_seconds_per_step")
            entry["top_op"] = r["top_ops"][0] if r["top_ops"] else None
        elif "images_per_s" in r and isinstance(r["images_per_s"], dict):
            entry.update({f"images_per_s {k}": v for k, v in r["images_per_s"].items()})
            if "peak_memory_bytes" in r:  # bench sample since 2026-12-05
                entry["peak_memory_gib"] = r["peak_memory_bytes"] / 2**30
        else:
            entry["images_per_s"] = r.get("images_per_s")
            entry["images_per_s_total"] = r.get("images_per_s_total")
            entry["peak_memory_gib"] = r["peak_memory_bytes"] / 2**30 if "peak_memory_bytes" in r else None
            entry["fraction_of_peak"] = r.get("fraction_of_peak")
            entry["compile"] = r.get("compile")
            if r.get("bare_step"):  # bench loop --step-iters: bench step's figure, same process
                b = r["bare_step"]
                entry["bare_step"] = {"images_per_s": b["images_per_s"], "fraction_of_peak": b["fraction_of_peak"],
                                      "peak_memory_gib": b["peak_memory_bytes"] / 2**30}
    else:
        entry["reason"] = r.get("reason")
    summary["steps"][name] = entry
summary["fid50k_estimate"] = fid
(out / "summary.json").write_text(json.dumps(summary, indent=2))

def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(int(spec.split(".")[0]))
W = max([18] + [len(name) for name in summary["steps"]])  # the longest step name sets the first column
print(f"\n{'step':{W}s} {'status':13s} {'images/s':>9s} {'total':>8s} {'peak GiB':>9s} {'of peak':>8s}  notes")
for name, e in summary["steps"].items():
    if "world_build_seconds" in e:
        parts = ", ".join(f"{p} {e.get(p + '_train_seconds')} s on {e.get(p + '_build_device')}"
                          for p in ("teacher", "vae", "evaluator"))
        print(f"{name:{W}s} {e['status']:13s} {'':>9s} {'':>8s} {'':>9s} {'':>8s}  "
              f"{e['world_build_seconds']} s in all: {parts}")
    elif "top_op" in e:
        top = e["top_op"]
        idle = "" if e["device_idle_share"] is None else f", device idle {100 * e['device_idle_share']:.1f}%"
        syncs = "" if e["host_syncs_per_step"] is None else f", {e['host_syncs_per_step']:g} host syncs a step"
        if e["device_gap_seconds_per_step"] is not None:
            syncs += f", {1e3 * e['device_gap_seconds_per_step']:.1f} ms of gaps between kernels"
        first = f", first {top['op']} {1e3 * top['seconds_per_step']:.1f} ms" if top else ""
        print(f"{name:{W}s} {e['status']:13s} {'':>9s} {'':>8s} {'':>9s} {'':>8s}  "
              f"{1e3 * e['step_seconds']:.1f} ms a {'loop ' if e['loop'] else ''}step profiled{idle}{syncs}{first}")
    elif any(k.startswith("images_per_s ") for k in e):
        notes = ", ".join(f"{k[13:]}: {v:.2f}/s" for k, v in e.items() if k.startswith("images_per_s "))
        print(f"{name:{W}s} {e['status']:13s} {'':>9s} {'':>8s} {fmt(e.get('peak_memory_gib'), '9.2f')} {'':>8s}  {notes}")
    else:
        frac = 100 * e["fraction_of_peak"] if e.get("fraction_of_peak") else None
        note = e.get("reason") or ("compiled" if e.get("compile") else "")
        print(f"{name:{W}s} {e['status']:13s} {fmt(e.get('images_per_s'), '9.1f')} {fmt(e.get('images_per_s_total'), '8.1f')}"
              f" {fmt(e.get('peak_memory_gib'), '9.2f')} {fmt(frac, '7.1f')}{'%' if frac else ' '}  {note}")
        if e.get("bare_step"):
            b = e["bare_step"]
            print(f"{'  its bare step':{W}s} {'':13s} {fmt(b['images_per_s'], '9.1f')} {'-':>8s}"
                  f" {fmt(b['peak_memory_gib'], '9.2f')} {fmt(100 * b['fraction_of_peak'], '7.1f')}%  as bench step")
if fid["status"] == "ok":
    print(f"FID-50K sampling estimate ({fid['sampler']}, batch {fid['samples_per_batch']}): "
          f"{fid['seconds']:.0f} s = {fid['hours']:.2f} h on this device")
print(f"suite wall time {wall} s; JSON in {out}")
EOF
# one archive of everything, made beside OUT first so that it does not hold a part of itself
tar -czf "$WORK/all-files.tar.gz" -C "$OUT_DIR" --exclude=./all-files.tar.gz . && mv "$WORK/all-files.tar.gz" "$OUT_DIR/"
