#!/usr/bin/env bash
# Head node of a multi-machine cluster. Run on the machine that should be "machine 0" (the head's machine
# is always machine 0; the others follow in ascending IP order).
set -euo pipefail
ray stop
ray start --head --port="${RAY_PORT:-6379}" --num-gpus="${NUM_GPUS:-8}"
