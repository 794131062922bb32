#!/usr/bin/env bash
# Every CUDA path of the project in one go, sized to finish within 8 minutes on one H100 or H200:
#
#     bash tools/fetch_wheels.sh                  # once, where PyPI is reachable
#     bash tools/gpu_check.sh OUT_DIR             # on the GPU machine, from the repository root
#     DEVICE=cpu bash tools/gpu_check.sh OUT_DIR  # every step in miniature (tests/test_gpu_check.py)
#
# Writes OUT_DIR/summary.txt (each step: passed, failed or skipped, then the numbers),
# OUT_DIR/results.json and one log per group of steps: 8 files, as many as the GPU machine's
# tool brings back. Each step runs under a timeout; a failure is recorded and the next step runs.
# The exit status is 0 only if every step passed.
#
# Environment: DEVICE (cuda where available, else cpu); STEPS, the groups to run (default: all of
# tests precision torchrun compile benchmark); BUDGET_S, the seconds for all steps (a step is
# skipped once fewer than MIN_STEP_S are left); PYTHON (python3).
set -euo pipefail

if (($# != 1)); then
    echo "usage: bash tools/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
PY=${PYTHON:-python3}
STEPS=${STEPS:-tests precision torchrun compile benchmark}
MIN_STEP_S=20
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/json"
rm -f "$OUT"/*.log "$OUT/summary.txt" "$OUT/results.json"
# the repository and the carried wheels (installed below) for every process, whatever its folder
export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}

if [[ $DEVICE == cpu ]]; then
    BUDGET_S=${BUDGET_S:-600}
    # tiny models: more threads only add synchronisation, which stalls on a busy machine
    export OMP_NUM_THREADS=1
    # inductor's cold compile takes minutes on two cores: in miniature, --compile captures the graphs
    # (dynamo: what our code controls) and runs them eagerly; AOTAutograd and code generation are torch's
    # own, checked on the GPU (aot_eager here would add 6 s to each of the three compiled steps)
    export TORCH_COMPILE_OVERRIDE_BACKENDS=">=0:eager"
    BACKEND=gloo
    TESTS_RAN=skipped  # the CUDA cases of the device tests skip on a CPU
    TINY=(--width 8 --image_size 8 --noise_steps 20 --n_samples 1)
    TRAIN=("${TINY[@]}" --limit 8 --batch_size 4)
    FOLDER=("${TINY[@]}" --batch_size 4)
    BENCH=(--repeats 1 --sample_n 2 --matmul_size 64 --noise_steps 20)
    DIGITS=(--image_size 8 --width 8 --batch_size 4)
    ORIGINAL=(--image_size 8 --c_in 3 --width 8 --unconditional)
    BATCHES=(4)
    SAMPLE_N=2
    DDIM_STEPS=5
else
    BUDGET_S=${BUDGET_S:-450}
    BACKEND=nccl
    TESTS_RAN=passed
    TRAIN=(--limit 512 --batch_size 64)  # the digits recipe (16x16, width 32, batch 64): 8 steps an epoch
    FOLDER=(--image_size 16 --width 32 --batch_size 16)
    BENCH=()
    DIGITS=()  # benchmark.py's defaults are the digits recipe's
    ORIGINAL=(--image_size 64 --c_in 3 --width 64 --unconditional)
    BATCHES=(12 64 128)
    SAMPLE_N=100
    DDIM_STEPS=50
fi

# step NAME GROUP CAP COMMAND...: run COMMAND in WORK within CAP seconds, or what is left of the
# budget (a step it cuts short counts as skipped), append its output to OUT/GROUP.log and record
# the outcome in WORK/steps.tsv. With EXPECT set, the output must also contain that text.
step() {
    local name=$1 group=$2 cap=$3
    shift 3
    [[ " $STEPS setup " == *" $group "* ]] || return 0
    local left=$((BUDGET_S - SECONDS)) start=$SECONDS status=passed note="" rc=0
    if ((left < MIN_STEP_S)); then
        printf '%s\tskipped\t0\tno time left\n' "$name" >>"$WORK/steps.tsv"
        return 0
    fi
    local limit=$((cap < left ? cap : left))
    printf '\n### %s: %s\n' "$name" "$*" >>"$OUT/$group.log"
    (cd "$WORK" && timeout -k 10 "$limit" "$@") >"$WORK/output" 2>&1 || rc=$?
    cat "$WORK/output" >>"$OUT/$group.log"
    if ((rc == 124 || rc == 137)) && ((limit < cap)); then
        status=skipped note="stopped after ${limit}s: no time left"
    elif ((rc == 124 || rc == 137)); then
        status=failed note="timed out after ${limit}s"
    elif ((rc != 0)); then
        status=failed note="exit status $rc: $(tail -n 1 "$WORK/output" | cut -c 1-120)"
    elif [[ -n ${EXPECT:-} ]] && ! grep -qF -- "$EXPECT" "$WORK/output"; then
        status=failed note="no '$EXPECT' in the output"
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - start)) "$note" >>"$WORK/steps.tsv"
}

# bench NAME CAP FLAGS...: one benchmark.py run, its result in WORK/json/NAME.json
bench() {
    local name=$1 cap=$2
    shift 2
    step "$name" benchmark "$cap" "$PY" "$ROOT/benchmark.py" --device "$DEVICE" "${BENCH[@]}" "$@" \
        --json "$WORK/json/$name.json"
}

# the packages the GPU machine lacks, from the wheels that tools/fetch_wheels.sh downloaded
if compgen -G "$ROOT/wheels/*.whl" >/dev/null; then
    step "install wheels/" setup 120 "$PY" -m pip install --quiet --no-index --no-deps --no-compile \
        --target "$WORK/site" "$ROOT"/wheels/*.whl
fi
step "environment" setup 60 "$PY" -m tools.gpu_check env --device "$DEVICE" --json "$WORK/json/env.json"

EXPECT=$TESTS_RAN step "device tests (pytest -m cuda)" tests 180 \
    "$PY" -m pytest -q -p no:cacheprovider -m cuda "$ROOT/tests"

step "every precision, resumed across them" precision 120 \
    "$PY" -m tools.gpu_check precision --json "$WORK/json/precision.json" -- --device "$DEVICE" "${TRAIN[@]}"

# a folder of PNG files: worker processes and pinned memory feed the GPU
step "image folder" torchrun 60 "$PY" -m tools.gpu_check folder data
EXPECT="world size 1 ($BACKEND)" step "torchrun, 1 process ($BACKEND)" torchrun 90 \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 "$ROOT/ddpm_conditional.py" --device "$DEVICE" \
    --dataset_path data --num_workers 2 "${FOLDER[@]}" --epochs 1 --run_name ddp
EXPECT="resuming ddp at epoch 1" step "torchrun, resumed" torchrun 90 \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 "$ROOT/ddpm_conditional.py" --device "$DEVICE" \
    --dataset_path data --num_workers 2 "${FOLDER[@]}" --epochs 2 --run_name ddp --resume

# the digits recipe, as the compiled benchmark row below: that row then finds its kernels cached
step "--compile training" compile 180 "$PY" "$ROOT/ddpm_conditional.py" --compile --device "$DEVICE" \
    "${TRAIN[@]}" --epochs 1 --sample_every 0 --run_name compiled

bench sampling_default 90 "${DIGITS[@]}" --repeats 1 --sample_n "$SAMPLE_N"
bench sampling_ddim50 90 "${DIGITS[@]}" --repeats 1 --sample_n "$SAMPLE_N" --sampler ddim --sample_steps "$DDIM_STEPS"
bench sampling_full_chain 120 "${DIGITS[@]}" --repeats 1 --sample_n "$SAMPLE_N" --full_chain
# eager rows first, the original's behaviour among them; the compiled ones, slowest to start, last
bench bench_digits 90 "${DIGITS[@]}" --precision bf16
bench "bench_original_run_b${BATCHES[0]}" 90 "${ORIGINAL[@]}" --batch_size "${BATCHES[0]}" --original
for b in "${BATCHES[@]}"; do
    bench "bench_original_config_b$b" 90 "${ORIGINAL[@]}" --batch_size "$b" --precision bf16
done
bench bench_digits_compiled 150 "${DIGITS[@]}" --precision bf16 --compile
for b in "${BATCHES[@]}"; do
    bench "bench_original_config_b${b}_compiled" 180 "${ORIGINAL[@]}" --batch_size "$b" --precision bf16 --compile
done

{
    echo "gpu_check on $DEVICE, $(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS}s"
    echo
    printf '%-40s %-8s %6s  %s\n' step status seconds note
    while IFS=$'\t' read -r name status seconds note; do
        printf '%-40s %-8s %6s  %s\n' "$name" "$status" "$seconds" "$note"
    done <"$WORK/steps.tsv"
    echo
    "$PY" -m tools.gpu_check results "$WORK" "$OUT" 2>&1 || echo "(no results.json: tools/gpu_check.py results failed)"
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
if grep -qv $'\tpassed\t' "$WORK/steps.tsv"; then
    exit 1
fi
