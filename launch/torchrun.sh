#!/usr/bin/env bash
# Train on one node: torchrun --standalone with one worker per visible GPU.
#
#   launch/torchrun.sh configs/1b.yaml parallel.engine=deepspeed parallel.zero_stage=1
#   NPROC_PER_NODE=2 launch/torchrun.sh configs/tiny.yaml parallel.engine=deepspeed   # CPU: 2 workers, gloo
#
# Without GPUs it starts NPROC_PER_NODE (default 1) CPU workers. SIGUSR1 or SIGTERM makes bigtrain
# save a checkpoint after the current step and exit with code 75 (continue with run.resume=auto).
# When a worker fails, the cause is the `bigtrain: error:` line above torchrun's own traceback and
# "Root Cause" block (how to read that block: docs/launch.md#reading-a-failed-torchrun).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [key=value ...]" >&2; exit 2; }
[[ -f $1 ]] || die "config file not found: $1"

set_workers_per_node
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m bigtrain train "$@"
