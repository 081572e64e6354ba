#!/usr/bin/env bash
# A worker machine: joins the head at HEAD_ADDRESS (ip:port). Start it with the GPUs it should own.
set -euo pipefail
: "${HEAD_ADDRESS:?set HEAD_ADDRESS=<head ip>:6379}"
ray stop
ray start --address="$HEAD_ADDRESS" --num-gpus="${NUM_GPUS:-8}"
