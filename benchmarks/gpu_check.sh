#!/usr/bin/env bash
# One prepared GPU check for commtrain, sized to finish within 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh                # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --device cpu   # dry run of every step on CPU (no GPU figures)
#
# Steps (each under its own timeout, all within GPU_CHECK_BUDGET_S, default 450 s):
#   env         device, torch/CUDA/NCCL/CuPy versions                       -> env.json
#   cupy        pip install cupy-cuda<12|13>x, only when CuPy is not importable
#   cupy_tests  tests/test_cupy_kernels.py (CuPy kernels vs the torch reference)
#   codecs      codec throughput vs the measured device copy bandwidth; target: fused
#               4-bit quantize+pack and unpack+dequantize >= 60% of copy  -> codecs.json
#   train       a 1-GPU training run, NCCL backend, 4-bit gradients, and
#               train.precision=bf16 when this version's config accepts it -> train/, train_report.json
#   streams     can codec work overlap compute (same stream / worker thread / own stream) -> streams.json
#   summary     the compact summary                                         -> summary.txt
#
# Outputs go to "$OUT" when set (the device runner collects it), else benchmarks/results/gpu_check.
# Exit status: 0 when every step ran and succeeded, 1 otherwise (the summary says which).
set -uo pipefail

DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="${2:-}"; shift 2 ;;
        --device=*) DEVICE="${1#--device=}"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (allowed: --device cuda|cpu)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in
    cuda|cpu) ;;
    *) echo "gpu_check.sh: --device '$DEVICE' is invalid; allowed: cuda, cpu" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START=$SECONDS
: > "$OUT/status.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's commtrain
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

if [ "$DEVICE" = cuda ]; then
    BACKEND=nccl; SIZES=64M,256M; RUNS=20; STREAM_N=32M; STREAM_RUNS=10
    TRAIN_SETS=(model.preset=gpt-micro train.steps=60 train.batch_size=16 train.seq_len=128)
else
    BACKEND=gloo; SIZES=256K; RUNS=3; STREAM_N=256K; STREAM_RUNS=3
    TRAIN_SETS=(model.preset=gpt-nano train.steps=6 train.batch_size=4 train.seq_len=32)
fi

# step NAME TIMEOUT_S COMMAND...: run with a timeout cut to the remaining budget; log to
# $OUT/NAME.log; record "NAME<TAB>rc<TAB>seconds" in status.tsv.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 15))  # keep 15 s for the summary
    if [ "$left" -lt 10 ]; then
        printf '%s\tskip\t\n' "$name" >> "$OUT/status.tsv"
        echo "gpu_check: $name skipped (time budget of ${BUDGET} s spent)"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS rc
    echo "gpu_check: $name (timeout ${limit} s) ..."
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/status.tsv"
    echo "gpu_check: $name rc=$rc in $((SECONDS - t0)) s"
    return "$rc"
}

step env 60 "$PY" benchmarks/gpu_check.py env --device "$DEVICE" --json "$OUT/env.json"

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import cupy" > /dev/null 2>&1; then
    # The wheel must match torch's CUDA major version (cupy-cuda12x or cupy-cuda13x).
    CUDA_MAJOR="$("$PY" -c 'import torch; print((torch.version.cuda or "12").split(".")[0])')"
    step cupy 150 "$PY" -m pip install --quiet --disable-pip-version-check "cupy-cuda${CUDA_MAJOR}x"
else
    printf 'cupy\tskip\t\n' >> "$OUT/status.tsv"
fi

step cupy_tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cupy_kernels.py

step codecs 120 "$PY" benchmarks/gpu_check.py codecs --device "$DEVICE" --sizes "$SIZES" --runs "$RUNS" \
    --json "$OUT/codecs.json"

PRECISION="$("$PY" benchmarks/gpu_check.py precision-flag 2> /dev/null || true)"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
SETS=()
for kv in "${TRAIN_SETS[@]}" "backend=$BACKEND" "train.eval_every=0" "train.eval_batches=2" \
          "compression.grad=quant:bits=4,group=128" "compression.policy=always" "train.progress=false" \
          "resume=false" "out_dir=$OUT/train" ${PRECISION:+"$PRECISION"}; do
    SETS+=(--set "$kv")
done
rm -rf "$OUT/train"
if step train 180 "$PY" -m torch.distributed.run --nproc_per_node=1 --master_addr=127.0.0.1 \
        --master_port="$PORT" -m commtrain train --config tiny "${SETS[@]}"; then
    "$PY" benchmarks/gpu_check.py train-report "$OUT/train" --json "$OUT/train_report.json" >> "$OUT/train.log" 2>&1
fi
rm -rf "$OUT/train/checkpoints"

step streams 90 "$PY" benchmarks/gpu_check.py streams --device "$DEVICE" --n "$STREAM_N" --runs "$STREAM_RUNS" \
    --json "$OUT/streams.json"

echo
"$PY" benchmarks/gpu_check.py summary "$OUT"
echo "gpu_check: outputs in $OUT ($((SECONDS - START)) s)"
# Failures: any step that did not exit 0, except a skipped CuPy install (already importable)
# and, in the CPU dry run, the CuPy tests skipping themselves (pytest rc 5: nothing ran).
if awk -F'\t' -v dev="$DEVICE" '$2 != "0" && !($1 == "cupy" && $2 == "skip") &&
        !(dev == "cpu" && $1 == "cupy_tests" && $2 == "5") { bad = 1 } END { exit !bad }' "$OUT/status.tsv"; then
    exit 1
fi
exit 0
