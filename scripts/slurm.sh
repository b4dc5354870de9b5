#!/bin/bash
# Train lit-ddpm with DDP on 2 nodes x 4 GPUs under SLURM; requeues itself before the time limit.
#   sbatch scripts/slurm.sh configs/cifar10.yaml
# 90 s before the time limit SLURM sends SIGUSR1 to every process of the step (data-loading workers ignore
# it): every rank stops after the same training step, rank 0 saves checkpoints/<run>/last.ckpt and then runs
# `scontrol requeue` once. The requeued job runs this same command, and `--ckpt_path last` resumes it from
# that last.ckpt, exactly (on the first start there is none yet: a fresh run). `scancel` (SIGTERM) also
# saves at a step boundary, without requeueing. docs/reliability.md says what each signal does.
#SBATCH --job-name=lit-ddpm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # one process per GPU: must equal --trainer.devices
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8            # data-loading workers per process
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --output=logs/slurm-%j.out

set -euo pipefail
CONFIG=${1:-configs/cifar10.yaml}

# The batch size is per process: 8 processes x 64 = an effective batch of 512 (scale model.optimizer.init_args.lr to taste).
srun .venv/bin/lit-ddpm fit --config "$CONFIG" --ckpt_path last \
    --trainer.strategy ddp --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE"
