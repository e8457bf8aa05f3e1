#!/usr/bin/env bash
# One node's part of a multi-node TP x CP launch: starts torchrun on this node.
# Run it once on every node, with the same arguments everywhere:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 examples/cluster/launch_node.sh video_qa \
#       --device cuda --bf16 --tensor-model-parallel-size 2 --context-parallel-size 8 ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 examples/cluster/launch_node.sh video_qa ...   (on node1)
#
# First argument: video_qa (python -m megatron_spava.video_qa) or bench_prefill
# (tools/bench_prefill.py); the rest goes to that program (see its --help).
#
# Environment:
#   NNODES            number of nodes (required)
#   NPROC_PER_NODE    ranks (GPUs) per node (default 8)
#   rendezvous, one of:
#     NODE_RANK + MASTER_ADDR [+ MASTER_PORT, default 29500]   static: node 0 hosts the store
#     RDZV_ENDPOINT=host:port [+ RDZV_ID]                       c10d (what the sbatch scripts use)
#   PYTHON            interpreter (default: python)
# torchrun gives every node a consecutive block of global ranks, and Megatron puts TP
# groups on consecutive ranks: with NPROC_PER_NODE a multiple of TP, TP stays inside a node
# and CP spans the nodes. The programs check this at start-up (megatron_spava.placement).
set -euo pipefail
cd "$(dirname "$0")/../.."
usage="usage: NNODES=N (NODE_RANK=i MASTER_ADDR=host | RDZV_ENDPOINT=host:port) $0 {video_qa|bench_prefill} [args...]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
case "$1" in
  video_qa) target=(-m megatron_spava.video_qa) ;;
  bench_prefill) target=(tools/bench_prefill.py) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
shift
: "${NNODES:?$usage}"
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-megatron-spava}")
else
  : "${NODE_RANK:?$usage}" "${MASTER_ADDR:?$usage}"
  rdzv=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
fi
# NVLink multicast (NVLS) off, as on the project's H200 machines; see README.md here for
# the network settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GLOO_SOCKET_IFNAME).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    "${rdzv[@]}" "${target[@]}" "$@"
