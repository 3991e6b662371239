#!/usr/bin/env bash
# Train on several nodes: run this once on every node (slurm/train.sbatch does so with srun).
# torchrun's c10d rendezvous: the agent on the endpoint's host serves it, the others join.
#
#   # on each of 4 nodes, node0 being the first:
#   NNODES=4 NODE_RANK=$i RDZV_ENDPOINT=node0:29400 launch/multinode.sh configs/7b.yaml \
#       parallel.engine=deepspeed parallel.zero_stage=1 parallel.tp=8
#   launch/multinode.sh --nnodes 4 --node-rank 1 --rdzv-endpoint node0:29400 configs/7b.yaml ...
#
# Flags (before CONFIG) or environment variables:
#   --nnodes N         NNODES         nodes (default $SLURM_NNODES, else 1); "MIN:MAX" for elastic
#   --node-rank R      NODE_RANK      this node's index (default $SLURM_NODEID). c10d assigns ranks
#                                     itself; nodes other than 0 use it to wait for the endpoint
#   --rdzv-endpoint H:P  RDZV_ENDPOINT  where node 0's agent serves the rendezvous (default
#                                     $MASTER_ADDR:${MASTER_PORT:-29400})
#   --rdzv-id ID       RDZV_ID        shared by the nodes of one job (default $SLURM_JOB_ID, else bigtrain)
#   NPROC_PER_NODE     workers per node (default: one per visible GPU; 1 on CPU)
#   RDZV_TIMEOUT       seconds to wait for the endpoint and for all nodes to join (default 300);
#                      then a clear error instead of a hang
#   MAX_RESTARTS       times torchrun restarts the workers after a failure (default 0)
#
# Network variables a cluster usually needs (export them before launching; names vary by site):
#   NCCL_SOCKET_IFNAME=ib0       interface for NCCL's bootstrap and socket transport (GLOO_SOCKET_IFNAME
#                                likewise for gloo); "^lo,docker" excludes instead
#   NCCL_IB_HCA=mlx5             InfiniBand/RoCE adapters to use; NCCL_IB_DISABLE=1 forces TCP sockets
#   NCCL_NET_GDR_LEVEL=PHB       GPUDirect RDMA distance; NCCL_CROSS_NIC=1 on rail-optimised fabrics
#   NCCL_DEBUG=WARN              INFO prints the chosen transports (first thing to check when slow)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1   abort on a failed collective instead of hanging
#   FI_PROVIDER=efa, FI_EFA_USE_DEVICE_RDMA=1   on AWS EFA (with the aws-ofi-nccl plugin)
#
# When a worker fails, the cause is the `bigtrain: error:` line above torchrun's own traceback and
# "Root Cause" block (how to read that block: docs/launch.md#reading-a-failed-torchrun).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

nnodes=${NNODES:-${SLURM_NNODES:-1}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
endpoint=${RDZV_ENDPOINT:-${MASTER_ADDR:+$MASTER_ADDR:${MASTER_PORT:-29400}}}
rdzv_id=${RDZV_ID:-${SLURM_JOB_ID:-bigtrain}}
while [[ $# -gt 0 && $1 == --* ]]; do
    [[ $# -ge 2 ]] || die "$1 needs a value"
    case $1 in
        --nnodes) nnodes=$2 ;;
        --node-rank) node_rank=$2 ;;
        --rdzv-endpoint) endpoint=$2 ;;
        --rdzv-id) rdzv_id=$2 ;;
        *) die "unknown option $1 (options: --nnodes --node-rank --rdzv-endpoint --rdzv-id)" ;;
    esac
    shift 2
done
[[ $# -ge 1 ]] || { echo "usage: $0 [--nnodes N] [--node-rank R] [--rdzv-endpoint HOST:PORT] [--rdzv-id ID] CONFIG [key=value ...]" >&2; exit 2; }
[[ -f $1 ]] || die "config file not found: $1"
[[ -n $endpoint ]] || die "no rendezvous endpoint: pass --rdzv-endpoint HOST:PORT or set RDZV_ENDPOINT"
timeout_s=${RDZV_TIMEOUT:-300}

# A node other than 0 first waits for the endpoint, so that a wrong host or a firewall is one clear
# line after RDZV_TIMEOUT seconds rather than torchrun's retries and traceback.
if [[ -n $node_rank && $node_rank != 0 ]]; then
    host=${endpoint%:*} port=${endpoint##*:}
    deadline=$((SECONDS + timeout_s))
    until timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; do
        ((SECONDS < deadline)) || die "rendezvous endpoint $endpoint not reachable after ${timeout_s} s" \
            "(is node 0 running? check RDZV_ENDPOINT and the firewall)"
        sleep 1
    done
fi

set_workers_per_node
exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id" \
    --rdzv-conf "join_timeout=$timeout_s" --max-restarts "${MAX_RESTARTS:-0}" \
    -m bigtrain train "$@"
