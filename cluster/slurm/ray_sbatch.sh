#!/bin/bash
# Start a Ray cluster across a SLURM allocation and run one cadiff job on it.
#   sbatch cluster/slurm/ray_sbatch.sh                                   # the default job below
#   sbatch --nodes=4 cluster/slurm/ray_sbatch.sh python jobs/sweep.py space=dit_width stage=latent num_samples=16
# The head runs on the first node of the allocation and every other node joins it as a worker (one `srun`
# step per node). The job then runs on the batch host (the head node) with RAY_ADDRESS set, so the jobs'
# `ray.init` connects to this cluster. data.root / out_root must be on a filesystem all nodes mount.
#SBATCH --job-name=cadiff-ray
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --cpus-per-task=32
#SBATCH --gpus-per-node=4
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

# Submit from the repository root (the default) or point CADIFF_ROOT at it; CADIFF_VENV is the environment
# made by `make setup` (TORCH_SPEC there picks the CUDA wheel).
CADIFF_ROOT="${CADIFF_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
CADIFF_VENV="${CADIFF_VENV:-$CADIFF_ROOT/.venv}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_WAIT_S="${RAY_WAIT_S:-300}"
cd "$CADIFF_ROOT"
# shellcheck disable=SC1091
source "$CADIFF_VENV/bin/activate"
export RAY_TRAIN_V2_ENABLED=1

if [ "$#" -gt 0 ]; then
    CMD=("$@")
else
    CMD=(python jobs/train_ae.py experiment=ae_default data.root=outputs/data/sim run_name=slurm_ae trainer.num_workers=8 trainer.gpus_per_worker=1 trainer.cpus_per_worker=6 strategy=ddp)
fi

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE="${NODES[0]}"
# First address only: nodes with several interfaces print them all.
HEAD_IP="$(srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" hostname --ip-address | awk '{print $1}')"
export RAY_ADDRESS="$HEAD_IP:$RAY_PORT"
CPUS="${SLURM_CPUS_PER_TASK:-1}"
GPUS="${SLURM_GPUS_ON_NODE:-0}"
echo "cadiff slurm: head $HEAD_NODE ($RAY_ADDRESS), ${#NODES[@]} node(s), $CPUS CPUs / $GPUS GPUs each"

STEP_PIDS=()
cleanup() {
    # Ending a step ends its `ray start --block`, which stops that node's Ray processes (and only those).
    for pid in "${STEP_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# --block keeps each `ray start` in the foreground of its srun step, so SLURM tracks and ends it.
srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" \
    ray start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \
    --num-cpus="$CPUS" --num-gpus="$GPUS" --dashboard-host=127.0.0.1 --block &
STEP_PIDS+=("$!")

wait_for_nodes() {
    # Poll the GCS until $1 nodes are alive or RAY_WAIT_S passes.
    local want="$1" deadline=$((SECONDS + RAY_WAIT_S)) have
    while true; do
        have="$(python -c 'import os, ray; ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null || echo 0)"
        if [ "$have" -ge "$want" ]; then
            echo "cadiff slurm: $have/$want Ray node(s) up"
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "cadiff slurm: error: only $have/$want Ray node(s) after ${RAY_WAIT_S}s" >&2
            return 1
        fi
        sleep 5
    done
}

wait_for_nodes 1
for node in "${NODES[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" \
        ray start --address="$RAY_ADDRESS" --num-cpus="$CPUS" --num-gpus="$GPUS" --block &
    STEP_PIDS+=("$!")
done
wait_for_nodes "${#NODES[@]}"

echo "cadiff slurm: running ${CMD[*]}"
set +e
"${CMD[@]}"
status=$?
set -e
echo "cadiff slurm: job exited with status $status"
exit "$status"
