#!/usr/bin/env bash
# The seed's 3-node cluster on one 8-GPU machine: two Ray nodes that own GPUs 0-3 and 4-7 (the
# CUDA_VISIBLE_DEVICES each `ray start` runs with is how Twinkle maps physical ranks to Ray nodes),
# plus a CPU-only node for the Processor. HEAD_IP is this machine's address.
set -euo pipefail
HEAD_IP="${HEAD_IP:-$(hostname -I | awk '{print $1}')}"
PORT="${RAY_PORT:-6379}"
ray stop
CUDA_VISIBLE_DEVICES=0,1,2,3 ray start --head --num-gpus=4 --port="$PORT"
CUDA_VISIBLE_DEVICES=4,5,6,7 ray start --address="$HEAD_IP:$PORT" --num-gpus=4
ray start --address="$HEAD_IP:$PORT" --num-gpus=0
export DEVICE_COUNT_PER_PHYSICAL_NODE=8   # GPUs per physical machine: turns a rank into (machine, device)
export TWINKLE_TRUST_REMOTE_CODE=0
echo "cluster up; now: DEVICE_COUNT_PER_PHYSICAL_NODE=8 twinkle-server plan deploy/examples/ranks.yaml"
