#!/usr/bin/env bash
# One-call GPU run of sage-fast's parity tests and benchmarks, sized for a 10-minute command.
#
#   bash benchmarks/run_gpu.sh                      # from the repository root, on a CUDA machine
#   SAGE_GIT_COMMIT=<sha> bash benchmarks/run_gpu.sh   # when the checkout has no .git
#
# Stages, in this order (each under a share of the time budget; a stage cut short by its limit gets
# SIGINT, so pytest still writes what it measured, and every measured case is already in
# records.jsonl):
#   1. env.json: device, driver, torch / triton / open_clip / xformers versions, SDPA kernel, date,
#      commit, command
#   2. GPU-only parity tests: pytest tests -m gpu                      -> parity.log, parity-junit.xml
#   3. end-to-end train step and inference (bench_train_step.py)      -> train_step.json
#   4. SG-Adapter kernels without torch.compile (-k "not compile")     -> adapter.json
#   5. losses without torch.compile (-k "not compile")                 -> loss.json
#   6. torch.compile baselines of the adapter (-k compile)             -> adapter_compile.json
#   7. torch.compile baselines of the losses (-k compile)              -> loss_compile.json
#   8. summary.md and chart.png over all stages (python -m benchmarks.report)
# The compile cases (one cold Inductor compile each) run last, so a short budget loses them and
# never the eager / fused numbers of the large shapes. All stages append to one records.jsonl and
# share one ceilings.json (measured by the first benchmark session).
# Output: benchmarks/results/<YYYY-MM-DD>-<device>/ (or $SAGE_RESULTS_DIR), passed to every pytest
# session as --sage-results-dir. Every benchmark case also checks its error against the eager
# reference: a case over its limit is recorded, then fails (see benchmarks/README.md).
#
# Time budget (SAGE_BUDGET_S, default 530 s, for a 600 s command): stage i gets
# min(max_i, left - keep_i) seconds, keep_i being kept for the stages after it (table below), and a
# stage that ignores SIGINT is killed KILL_GRACE (10) s later. Every stage therefore ends by
# BUDGET - 15 + 10 = 525 s, and the report (a few seconds) follows.
#
# Knobs (environment): SAGE_BUDGET_S; SAGE_STAGES (comma list of parity,train,adapter,loss;
# default all; when set, the records and ceilings already in the results folder are kept, so a
# second call can fill in a stage the first one ran out of time for; adapter and loss include their
# compile pass); SAGE_NO_COMPILE=1 (drop the torch.compile baselines, the slow part);
# SAGE_ALLOW_CPU=1 (run anyway without CUDA: CPU smoke); SAGE_RESULTS_DIR; SAGE_EXPORT_DIR (at the
# end, write there <results folder name>.tar.gz with the whole folder, plus its summary.md: two
# files, as a remote runner that returns only a few files of its output folder needs); PYTHON
# (interpreter, default python3, else python).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${SAGE_BUDGET_S:-530}
KILL_GRACE=10
START=$SECONDS
COMMAND="bash $0${*:+ $*}"

# Hypothesis (the parity tests use it) keeps its folder out of the repository, as in a plain pytest run.
export HYPOTHESIS_STORAGE_DIRECTORY=${HYPOTHESIS_STORAGE_DIRECTORY:-${TMPDIR:-/tmp}/sage-fast-hypothesis-$(id -u)}

left() { echo $(( BUDGET - (SECONDS - START) )); }
# cap <max seconds> <seconds to keep for later stages>: this stage's limit
cap() {
    local max=$1 keep=$2 avail
    avail=$(( $(left) - keep ))
    (( avail > max )) && avail=$max
    (( avail < 0 )) && avail=0
    echo "$avail"
}
stage() { echo; echo "=== [$(date -u +%H:%M:%S), $(( SECONDS - START ))s] $*"; }

# Wheels carried from the development machine (benchmarks/gpu_wheels.sh): the GPU image has no
# open_clip_torch and cannot download it.
if compgen -G ".whl/*.whl" > /dev/null; then
    stage "installing carried wheels from .whl/"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "cannot install the carried wheels" >&2; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

missing=$($PY - <<'EOF'
import importlib.util
need = ["torch", "triton", "open_clip", "pytest", "pytest_benchmark", "matplotlib"]
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
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [[ "${SAGE_ALLOW_CPU:-0}" != "1" ]]; then
        echo "run_gpu.sh: no CUDA device (set SAGE_ALLOW_CPU=1 for a CPU smoke run)" >&2
        exit 2
    fi
fi

SLUG=$($PY -c "from benchmarks.harness import device_slug; print(device_slug())")
RESULTS=${SAGE_RESULTS_DIR:-benchmarks/results/$(date -u +%Y-%m-%d)-$SLUG}
mkdir -p "$RESULTS"
STAGES=${SAGE_STAGES:-parity,train,adapter,loss}
if [[ -z "${SAGE_STAGES:-}" ]]; then
    rm -f "$RESULTS/records.jsonl" "$RESULTS/skipped.json" "$RESULTS/ceilings.json"   # a full run starts afresh
fi
want() { [[ ",$STAGES," == *",$1,"* ]]; }

stage "environment -> $RESULTS/env.json"
SAGE_RUN_COMMAND="$COMMAND" $PY - "$RESULTS/env.json" <<'EOF'
import json, os, sys
from benchmarks.harness import collect_env
env = collect_env(command=os.environ["SAGE_RUN_COMMAND"])
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
EOF
nvidia-smi 2>/dev/null | head -20 || true

COMMON=(-q -p no:cacheprovider --sage-results-dir "$RESULTS" --sage-append --benchmark-columns=median,iqr,rounds,iterations)
COMPILE=1
if [[ "${SAGE_NO_COMPILE:-0}" == "1" ]]; then COMMON+=(--sage-no-compile); COMPILE=0; fi

run_stage() {  # run_stage <limit s> <log name> <pytest args...>
    local limit=$1 log=$2; shift 2
    if (( limit < 10 )); then
        echo "skipped: out of time budget" | tee "$RESULTS/$log.log"
        return
    fi
    echo "time limit ${limit}s"
    timeout -s INT -k "$KILL_GRACE" "$limit" $PY -m pytest "$@" 2>&1 | tee "$RESULTS/$log.log"
    echo "exit status ${PIPESTATUS[0]}" | tee -a "$RESULTS/$log.log"
}

# Stage caps: cap <max s> <s kept for the later stages>. Worst case with the default budget (every
# stage runs to its limit and is killed KILL_GRACE s later; about 5 s before the first stage):
#   parity 120 (ends <= 135), train 130 (<= 275), adapter 90 (<= 375), loss 55 (<= 440),
#   adapter compile 40 (<= 490), loss compile 25 (<= 525); then the report.
if want parity; then
    stage "GPU parity tests: pytest tests -m gpu"
    run_stage "$(cap 120 360)" parity tests -m gpu -p no:cacheprovider -ra --junitxml="$RESULTS/parity-junit.xml"
fi
if want train; then
    stage "end-to-end: training step and inference"
    run_stage "$(cap 130 240)" train_step benchmarks/bench_train_step.py "${COMMON[@]}" --benchmark-json="$RESULTS/train_step.json"
fi
if want adapter; then
    stage "SG-Adapter kernels (eager, fused_torch, fused)"
    run_stage "$(cap 90 150)" adapter benchmarks/bench_adapter.py -k "not compile" "${COMMON[@]}" --benchmark-json="$RESULTS/adapter.json"
fi
if want loss; then
    stage "losses (eager, fused)"
    run_stage "$(cap 60 100)" loss benchmarks/bench_loss.py -k "not compile" "${COMMON[@]}" --benchmark-json="$RESULTS/loss.json"
fi
if want adapter && (( COMPILE )); then
    stage "SG-Adapter torch.compile baselines"
    run_stage "$(cap 150 50)" adapter_compile benchmarks/bench_adapter.py -k compile "${COMMON[@]}" --benchmark-json="$RESULTS/adapter_compile.json"
fi
if want loss && (( COMPILE )); then
    stage "loss torch.compile baselines"
    run_stage "$(cap 150 15)" loss_compile benchmarks/bench_loss.py -k compile "${COMMON[@]}" --benchmark-json="$RESULTS/loss_compile.json"
fi

stage "report"
$PY -m benchmarks.report "$RESULTS" --print
echo
echo "results in $RESULTS ($(( SECONDS - START ))s)"
ls -la "$RESULTS"
if [[ -n "${SAGE_EXPORT_DIR:-}" ]]; then
    NAME=$(basename "$RESULTS")
    mkdir -p "$SAGE_EXPORT_DIR" \
        && tar -czf "$SAGE_EXPORT_DIR/$NAME.tar.gz" -C "$(dirname "$RESULTS")" "$NAME" \
        && { [[ ! -f "$RESULTS/summary.md" ]] || cp "$RESULTS/summary.md" "$SAGE_EXPORT_DIR/summary.md"; } \
        && echo "exported to $SAGE_EXPORT_DIR: $NAME.tar.gz (the whole folder) and summary.md"
fi
