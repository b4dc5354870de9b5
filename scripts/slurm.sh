#!/bin/bash
# Train lit-ddpm with DDP on 2 nodes x 4 GPUs under SLURM; resubmits itself when pre-empted.
#   sbatch scripts/slurm.sh configs/cifar10.yaml
# Lightning reads the SLURM environment (ranks, master address) and, on SIGUSR1 sent 90 s before the
# time limit, saves checkpoints/hpc_ckpt_N.ckpt and requeues the job; under SLURM, a run started without
# --ckpt_path resumes from the newest hpc_ckpt_N.ckpt in --trainer.default_root_dir by itself.
#SBATCH --job-name=lit-ddpm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # one process per GPU: must equal --trainer.devices
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8            # data-loading workers per process
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --output=logs/slurm-%j.out

set -euo pipefail
CONFIG=${1:-configs/cifar10.yaml}

# The batch size is per process: 8 processes x 64 = an effective batch of 512 (scale model.optimizer.init_args.lr to taste).
srun .venv/bin/lit-ddpm fit --config "$CONFIG" \
    --trainer.strategy ddp --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" \
    --trainer.default_root_dir checkpoints
