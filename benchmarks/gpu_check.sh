#!/usr/bin/env bash
# GPU readiness check, for a machine with CUDA GPUs (never part of the test suite; refuses without a GPU).
#
# On tiny simulated clips, through the jobs' own CLIs:
#   1. stage 1 (ae_tiny) and stage 2 (dit_tiny on its latents): bf16, trainer.compile=blocks, 1 GPU worker (DDP);
#      with 2+ GPUs the same again on 2 workers over NCCL;
#   2. exact resume on CUDA: data.deterministic=true, N + resume + N steps == 2N steps (fp32, bitwise export);
# and writes benchmarks/results/gpu_check.md (one row per check: ok/FAILED, seconds, last metrics line).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to choose the interpreter, STEPS=... (default 20)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${STEPS:-20}
OUT=benchmarks/results/gpu_check.md

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
if [[ -z "$GPUS" || "$GPUS" -lt 1 ]]; then
    echo "gpu_check: error: no CUDA GPU visible to $PY (torch.cuda.is_available() is false); run it on a GPU machine" >&2
    exit 2
fi
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
WORK=$(mktemp -d -t cadiff-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROWS=()
FAILED=0

# check NAME COMMAND...: run one job, record ok/FAILED, its wall time and its final line
check() {
    local name=$1; shift
    local start=$SECONDS
    if "$@" >"$WORK/$name.log" 2>&1; then status=ok; else status=FAILED; FAILED=1; fi
    local last
    last=$(grep -E "^cadiff |error" "$WORK/$name.log" | tail -1 | tr '|' '/' | cut -c1-200)
    ROWS+=("| $name | $status | $((SECONDS - start)) | \`$last\` |")
    echo "gpu_check: $name: $status ($((SECONDS - start)) s)"
}

COMMON=(out_root="$WORK/outputs" trainer.gpus_per_worker=1 trainer.max_steps="$STEPS" trainer.log_every=5)
FAST=(trainer.precision=bf16 trainer.compile=blocks strategy=ddp)

"$PY" -c "from pathlib import Path; from cadiff.testing.data import prepare_sim; prepare_sim(Path('$WORK/data'))" \
    >"$WORK/prepare.log" 2>&1 || { echo "gpu_check: error: preparing the simulated data failed:" >&2; tail -3 "$WORK/prepare.log" >&2; exit 1; }

for WORKERS in 1 2; do
    if [[ $WORKERS -gt $GPUS ]]; then
        ROWS+=("| stage1/stage2 on $WORKERS workers (NCCL) | skipped: $GPUS GPU visible | | |")
        continue
    fi
    check "stage1_bf16_compile_w$WORKERS" "$PY" jobs/train_ae.py experiment=ae_tiny data.root="$WORK/data" \
        run_name="s1w$WORKERS" trainer.num_workers="$WORKERS" "${COMMON[@]}" "${FAST[@]}"
    check "encode_w$WORKERS" "$PY" jobs/encode_latents.py stage1="$WORK/outputs/train_ae/s1w$WORKERS" \
        data.root="$WORK/data" out="$WORK/latents/w$WORKERS"
    check "stage2_bf16_compile_w$WORKERS" "$PY" jobs/train_latent.py experiment=dit_tiny \
        latents.root="$WORK/latents/w$WORKERS" run_name="s2w$WORKERS" trainer.num_workers="$WORKERS" \
        "${COMMON[@]}" "${FAST[@]}"
done

# exact resume on CUDA: the determinism flags (loop.use_deterministic_cuda) make N + resume + N == 2N, bitwise
EXACT=(experiment=ae_tiny data.root="$WORK/data" data.deterministic=true strategy=ddp trainer.num_workers=1
       trainer.precision=fp32 "${COMMON[@]}")
check resume_full "$PY" jobs/train_ae.py "${EXACT[@]}" run_name=full
check resume_first_half "$PY" jobs/train_ae.py "${EXACT[@]}" run_name=split trainer.stop_at_step=$((STEPS / 2))
check resume_second_half "$PY" jobs/train_ae.py "${EXACT[@]}" run_name=split
check resume_bitwise "$PY" -c "
import sys, torch
from cadiff.runtime.exports import load_export
a, _, _ = load_export('$WORK/outputs/train_ae/full/export/model.pt')
b, _, _ = load_export('$WORK/outputs/train_ae/split/export/model.pt')
worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
print(f'cadiff gpu_check: max abs diff 2N vs N + resume + N: {worst:.3g}')
sys.exit(0 if worst == 0.0 else 1)"

{
    echo "# GPU check"
    echo
    echo "\`benchmarks/gpu_check.sh\` on $(hostname), $GPUS x $GPU_NAME, $(date -u +%Y-%m-%dT%H:%MZ), $STEPS steps per run,"
    echo "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')."
    echo
    echo "| check | result | seconds | last line |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
} >"$OUT.tmp" && mv "$OUT.tmp" "$OUT"
echo "gpu_check: wrote $OUT"
exit $FAILED
