#!/usr/bin/env bash
# One-call GPU run of sage-fast: parity tests, timings, launch-configuration tuning, end-to-end numbers,
# sized for a 10-minute command (the default budget, 540 s, leaves a minute of margin). An offline GPU
# machine gets the wheels it lacks from benchmarks/gpu_wheels.sh (in .whl/, installed here first).
#
#   bash benchmarks/run_gpu.sh                                   # from the repository root, on a CUDA machine
#   SAGE_GIT_COMMIT=<sha> SAGE_EXPORT_DIR=$OUT bash benchmarks/run_gpu.sh   # a copy without .git; export
#
# Stages, most valuable first (each under its own time limit, see below; a stage cut short by its limit
# gets SIGINT, so pytest and the tuner still write what they measured, and every measured case is
# already in records.jsonl):
#   0. setup: the wheels in .whl/ into /tmp/site, package and CUDA checks, env.json (GPU, driver, CUDA, versions)
#   1. parity           pytest tests -m gpu (-n 6 with pytest-xdist)          -> parity.log, parity-junit.xml
#   2. adapter          bench_adapter.py -k "not compile" (eager, fused_torch, fused, autocast)  -> adapter.json
#   3. loss             bench_loss.py -k "not compile" (eager, fused)          -> loss.json
#   4. tune             python -m benchmarks.tuning run: launch-configuration grid per kernel, correctness
#                       gate, noise margin                                      -> tune.json, tuned_launch.json
#   5. train            bench_train_step.py -k "not compile": training step (floors, reference, fused;
#                       FIT on and off; peak memory of each) and inference      -> train_step.json
#   6. encoder          bench_encoder.py: the frozen ViT-B/16 forward + backward with attention open_clip,
#                       sdpa and xformers, parity against each other            -> encoder.json
#   7. input            bench_input_pipeline.py: loader images/s on generated JPEGs (CPU workers, gpu_decode);
#                       bench_input_decode.py: per-worker raw vs fast_decode vs prepared shards, 16 workers on shards
#   8. adapter_compile  bench_adapter.py -k compile (fwd+bwd first)            -> adapter_compile.json
#   9. train_compile    bench_train_step.py -k compile (the fused model under torch.compile, FIT on first)
#  10. loss_compile     bench_loss.py -k compile (C = 8142 first)              -> loss_compile.json
#  11. summary.md and chart.png over everything (python -m benchmarks.report)
# Every stage measures the committed tuned table (sage_fast/ops/tuned_launch.json); the tune stage writes
# its new table into the results folder only (commit it, and the next run confirms it).
#
# Time budget (SAGE_BUDGET_S, default 540 s): stage i gets min(MAX_i, max(RESERVE_i, left - KEEP_i))
# seconds, never more than left - REPORT_S, where KEEP_i is what the later enabled stages
# are guaranteed (their RESERVE, plus KILL_GRACE each for those with a reserve) plus REPORT_S for the
# report: a stage's own guarantee comes before the later ones' (a short budget loses the last stages
# first); a stage with less than 10 s is skipped. A stage that
# ignores SIGINT is killed KILL_GRACE (10) s later. So even if every stage runs to its limit, the last
# one ends by BUDGET - REPORT_S + KILL_GRACE and the report follows; stages that finish early pass
# their time on. The results are exported after every stage (SAGE_EXPORT_DIR), so a command killed
# from outside still leaves the stages it finished.
#
# Knobs (environment): SAGE_BUDGET_S; SAGE_STAGES (comma list of the stage names above; default all;
# when set, the records and ceilings already in the results folder are kept, so a second call can fill
# in a stage the first one ran out of time for); SAGE_NO_COMPILE=1 (drop the three *_compile stages);
# SAGE_ALLOW_CPU=1 (run without CUDA: CPU smoke; the GPU-only cases skip); SAGE_RESULTS_DIR;
# SAGE_EXPORT_DIR (write there <results folder name>.tar.gz with the whole folder, its summary.md and
# the tuned table tuned_launch.json: three files); PYTHON (default python3, else python).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${SAGE_BUDGET_S:-540}
KILL_GRACE=10
REPORT_S=15
START=$SECONDS
COMMAND="bash $0${*:+ $*}"

# Hypothesis (the parity tests use it) keeps its folder out of the repository, as in a plain pytest run.
export HYPOTHESIS_STORAGE_DIRECTORY=${HYPOTHESIS_STORAGE_DIRECTORY:-${TMPDIR:-/tmp}/sage-fast-hypothesis-$(id -u)}

# name, at most (s), guaranteed when its turn comes (s)
STAGE_TABLE=(
    "parity 120 75"
    "adapter 80 50"
    "loss 40 25"
    "tune 170 100"
    "train 100 70"
    "encoder 60 30"
    "input 40 20"
    "adapter_compile 60 20"
    "train_compile 100 0"
    "loss_compile 40 0"
)
ALL_STAGES=$(printf '%s\n' "${STAGE_TABLE[@]}" | awk '{print $1}' | paste -sd, -)
STAGES=${SAGE_STAGES:-$ALL_STAGES}
if [[ "${SAGE_NO_COMPILE:-0}" == "1" ]]; then
    STAGES=$(echo "$STAGES" | tr ',' '\n' | grep -v '_compile$' | paste -sd, -)
fi
for s in ${STAGES//,/ }; do
    [[ ",$ALL_STAGES," == *",$s,"* ]] || { echo "run_gpu.sh: unknown stage '$s' (stages: $ALL_STAGES)" >&2; exit 2; }
done
want() { [[ ",$STAGES," == *",$1,"* ]]; }

PLAN_ONLY=${SAGE_PLAN_ONLY:-0}
SIM_OFFSET=0  # SAGE_PLAN_ONLY: simulated seconds spent
# seconds of the budget left; a plan counts simulated time only (a slow shell must not shift its numbers)
left() {
    if [[ "$PLAN_ONLY" == "1" ]]; then echo $(( BUDGET - SIM_OFFSET )); else echo $(( BUDGET - (SECONDS - START) - SIM_OFFSET )); fi
}
# keep_after <stage>: seconds the enabled stages after it are guaranteed, plus the report
keep_after() {
    local seen=0 keep=$REPORT_S name max reserve
    for row in "${STAGE_TABLE[@]}"; do
        read -r name max reserve <<< "$row"
        if (( seen )) && want "$name" && (( reserve > 0 )); then
            keep=$(( keep + reserve + KILL_GRACE ))
        fi
        [[ "$name" == "$1" ]] && seen=1
    done
    echo "$keep"
}
# limit <stage>: this stage's time limit now: what the later stages' guarantees leave, but at least its
# own guarantee (an earlier stage's comes first), never into the report's time, at most its maximum
limit() {
    local name max reserve avail last
    for row in "${STAGE_TABLE[@]}"; do
        read -r name max reserve <<< "$row"
        [[ "$name" == "$1" ]] && break
    done
    avail=$(( $(left) - $(keep_after "$1") ))
    (( avail < reserve )) && avail=$reserve
    last=$(( $(left) - REPORT_S ))
    (( avail > last )) && avail=$last
    (( avail > max )) && avail=$max
    (( avail < 0 )) && avail=0
    echo "$avail"
}
stage() { echo; echo "=== [$(date -u +%H:%M:%S), $(( SECONDS - START ))s] $*"; }

# SAGE_PLAN_ONLY=1: print the worst-case schedule (setup taking SAGE_PLAN_SETUP_S, default 25 s; every
# stage running to its limit, then its grace) and exit without running anything.
if [[ "$PLAN_ONLY" == "1" ]]; then
    SIM_OFFSET=${SAGE_PLAN_SETUP_S:-25}
    for row in "${STAGE_TABLE[@]}"; do
        read -r name max reserve <<< "$row"
        want "$name" || continue
        lim=$(limit "$name")
        if (( lim < 10 )); then
            echo "plan $name start $SIM_OFFSET limit 0 end $SIM_OFFSET reserve $reserve skipped"
            continue
        fi
        echo "plan $name start $SIM_OFFSET limit $lim end $(( SIM_OFFSET + lim + KILL_GRACE )) reserve $reserve"
        SIM_OFFSET=$(( SIM_OFFSET + lim + KILL_GRACE ))
    done
    echo "plan report start $SIM_OFFSET budget $BUDGET report_s $REPORT_S"
    exit 0
fi

# Wheels downloaded on a machine with internet access (benchmarks/gpu_wheels.sh: open_clip_torch, ftfy,
# wcwidth, xformers) and copied here with the repository: an offline GPU machine cannot download them.
if compgen -G ".whl/*.whl" > /dev/null; then
    stage "installing the wheels in .whl/ into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "cannot install the wheels in .whl/" >&2; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

missing=$($PY - <<'EOF'
import importlib.util
need = ["torch", "triton", "torchvision", "open_clip", "pytest", "pytest_benchmark", "matplotlib", "PIL", "numpy",
        "yaml"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
    echo "run_gpu.sh: missing Python packages: $missing" >&2
    exit 3
fi
if ! $PY -c "import sage_fast.kernels" 2>/dev/null; then
    stage "installing sage-fast (editable, no dependencies)"
    $PY -m pip install -q -e . --no-deps --no-build-isolation || { echo "cannot install sage-fast" >&2; exit 3; }
    # the kernels live in kernels/ and are importable only through the install's package mapping
    $PY -c "import sage_fast.kernels" || { echo "sage_fast.kernels is not importable after the install" >&2; exit 3; }
fi

SLUG=$($PY -c "
import sys, torch
from benchmarks.environment import device_slug
if not torch.cuda.is_available() and '${SAGE_ALLOW_CPU:-0}' != '1':
    sys.exit('run_gpu.sh: no CUDA device (set SAGE_ALLOW_CPU=1 for a CPU smoke run)')
print(device_slug())") || exit 2
RESULTS=${SAGE_RESULTS_DIR:-benchmarks/results/$(date -u +%Y-%m-%d)-$SLUG}
mkdir -p "$RESULTS"
if [[ -z "${SAGE_STAGES:-}" ]]; then
    # a full run starts afresh
    rm -f "$RESULTS/records.jsonl" "$RESULTS/skipped.json" "$RESULTS/ceilings.json" "$RESULTS/tune.json" \
          "$RESULTS/tuned_launch.json"
fi

export_results() {  # the folder as one archive, its summary and the tuned table (three files)
    [[ -n "${SAGE_EXPORT_DIR:-}" ]] || return 0
    local name
    name=$(basename "$RESULTS")
    mkdir -p "$SAGE_EXPORT_DIR" \
        && tar -czf "$SAGE_EXPORT_DIR/$name.tar.gz.tmp" -C "$(dirname "$RESULTS")" "$name" \
        && mv "$SAGE_EXPORT_DIR/$name.tar.gz.tmp" "$SAGE_EXPORT_DIR/$name.tar.gz"
    [[ ! -f "$RESULTS/summary.md" ]] || cp "$RESULTS/summary.md" "$SAGE_EXPORT_DIR/summary.md"
    [[ ! -f "$RESULTS/tuned_launch.json" ]] || cp "$RESULTS/tuned_launch.json" "$SAGE_EXPORT_DIR/tuned_launch.json"
}

stage "environment -> $RESULTS/env.json (budget ${BUDGET}s, stages $STAGES)"
SAGE_RUN_COMMAND="$COMMAND" $PY - "$RESULTS/env.json" <<'EOF'
import json, os, sys
from benchmarks.environment import collect_env
from benchmarks.records import write_json
from sage_fast.ops import launch
env = collect_env(command=os.environ["SAGE_RUN_COMMAND"])
env["tuned_table"] = {"path": str(launch.table_path()), "entries": len(launch.installed_entries())}
write_json(sys.argv[1], env)
print(json.dumps(env, indent=2))
EOF
nvidia-smi 2>/dev/null | head -20 || true

COMMON=(-q -p no:cacheprovider --sage-results-dir "$RESULTS" --sage-append --benchmark-columns=median,iqr,rounds)
if [[ "${SAGE_NO_COMPILE:-0}" == "1" ]]; then COMMON+=(--sage-no-compile); fi

# run_stage <stage> <command...>: run under the stage's limit, log to <stage>.log, export afterwards
run_stage() {
    local name=$1 lim
    shift
    want "$name" || return 0
    lim=$(limit "$name")
    stage "$name: $* (time limit ${lim}s)"
    if (( lim < 10 )); then
        echo "skipped: out of time budget" | tee "$RESULTS/$name.log"
        return 0
    fi
    STAGE_LIMIT=$lim timeout -s INT -k "$KILL_GRACE" "$lim" "$@" 2>&1 | tee "$RESULTS/$name.log"
    echo "exit status ${PIPESTATUS[0]} after $(( SECONDS - START ))s" | tee -a "$RESULTS/$name.log"
    export_results
}

PARITY=($PY -m pytest tests -m gpu -p no:cacheprovider -ra --junitxml="$RESULTS/parity-junit.xml")
if $PY -c "import xdist" 2>/dev/null; then
    # pytest-xdist (in the GPU image): 6 processes compile the Triton kernels of the parity tests side by
    # side; should xdist itself fail (internal or usage error), run them serially in the time left
    run_stage parity bash -c '"$@" -n 6; rc=$?
        if (( rc == 3 || rc == 4 )); then echo "pytest-xdist failed (exit $rc): the parity tests serially"; exec "$@"; fi
        exit $rc' parity "${PARITY[@]}"
else
    run_stage parity "${PARITY[@]}"
fi
run_stage adapter $PY -m pytest benchmarks/bench_adapter.py -k "not compile" "${COMMON[@]}" \
    --benchmark-json="$RESULTS/adapter.json"
run_stage loss $PY -m pytest benchmarks/bench_loss.py -k "not compile" "${COMMON[@]}" --benchmark-json="$RESULTS/loss.json"
# the tuner stops measuring 15 s before its limit (start-up and writing), keeping what it measured
run_stage tune bash -c "exec $PY -m benchmarks.tuning run --results '$RESULTS' --budget-s \$(( STAGE_LIMIT - 15 ))"
run_stage train $PY -m pytest benchmarks/bench_train_step.py -k "not compile" "${COMMON[@]}" \
    --benchmark-json="$RESULTS/train_step.json"
run_stage encoder $PY -m pytest benchmarks/bench_encoder.py "${COMMON[@]}" --benchmark-json="$RESULTS/encoder.json"
run_stage input $PY -m pytest benchmarks/bench_input_pipeline.py benchmarks/bench_input_decode.py "${COMMON[@]}" --benchmark-json="$RESULTS/input.json"
run_stage adapter_compile $PY -m pytest benchmarks/bench_adapter.py -k compile --sage-priority "${COMMON[@]}" \
    --benchmark-json="$RESULTS/adapter_compile.json"
run_stage train_compile $PY -m pytest benchmarks/bench_train_step.py -k compile --sage-priority "${COMMON[@]}" \
    --benchmark-json="$RESULTS/train_compile.json"
run_stage loss_compile $PY -m pytest benchmarks/bench_loss.py -k compile --sage-priority "${COMMON[@]}" \
    --benchmark-json="$RESULTS/loss_compile.json"

stage "report"
$PY -m benchmarks.report "$RESULTS" --print
echo
echo "results in $RESULTS ($(( SECONDS - START ))s)"
ls -la "$RESULTS"
export_results
if [[ -n "${SAGE_EXPORT_DIR:-}" ]]; then
    echo "exported to $SAGE_EXPORT_DIR: $(basename "$RESULTS").tar.gz (the whole folder), summary.md, tuned_launch.json"
fi
