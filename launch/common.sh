# Shared by launch/torchrun.sh and launch/multinode.sh (sourced, not run).

die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }

# Python of the active environment (a venv's `python`, else python3).
PYTHON=$(command -v python || command -v python3) || die "no python on PATH; activate bigtrain's environment"

visible_gpus() { "$PYTHON" -c 'import torch; print(torch.cuda.device_count())'; }

# Sets $nproc, the workers per node: $NPROC_PER_NODE, else one per visible GPU, else 1 (CPU, where
# DeepSpeed gets its CPU accelerator). Refuses a node where Slurm allocated GPUs torch cannot see.
set_workers_per_node() {
    local gpus
    gpus=$(visible_gpus) || die "cannot import torch with $PYTHON"
    if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 && $gpus == 0 ]]; then
        die "Slurm allocated ${SLURM_GPUS_ON_NODE} GPU(s) on $(hostname -s) but torch sees none" \
            "(CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}); check the node's driver and torch's CUDA build"
    fi
    if [[ $gpus == 0 ]]; then
        export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
    nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
}

# bigtrain's workers handle SIGUSR1 (checkpoint and stop); torchrun's agent would die of it, so it
# ignores it (an ignored signal stays ignored across exec; the workers install their own handler).
# Slurm delivers a step's signals to every process of the step, workers included.
trap '' USR1
