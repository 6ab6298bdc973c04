#!/bin/bash
# Multi-machine training under SLURM: one task per machine, each running `accelerate launch` for its GPUs.
#
#   sbatch examples/slurm_multi_node.sh                                   # check the launch only (seconds, no model)
#   sbatch examples/slurm_multi_node.sh -m vlm_recipes.sft recipes/chartqa.yaml
#   ACCELERATE_CONFIG=accelerate_configs/zero3.yaml sbatch examples/slurm_multi_node.sh \
#       -m vlm_recipes.sft recipes/chartqa_full.yaml
#
# Every run starts with `vlm_recipes.launch_check`: all machines join and an all-reduce works, before any model loads.
# Global batch = per_device_train_batch_size x gradient_accumulation_steps x (nodes x GPUS_PER_NODE).
#SBATCH --job-name=vlm-recipes
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

# One task per machine; each fills in its own machine rank from SLURM_NODEID (hence the quoted \$).
launch() {
    srun --ntasks-per-node=1 bash -c "accelerate launch --config_file $ACCELERATE_CONFIG \
        --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
        --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_PROCESS_IP --main_process_port $MAIN_PROCESS_PORT \
        $*"
}

launch -m vlm_recipes.launch_check
if [ $# -gt 0 ]; then
    launch "$@"
fi
