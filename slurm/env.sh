# NCCL, network and runtime settings for every peft-dist Slurm job, in one place (sourced by launch.sh
# and deepspeed.sbatch). Values already set in the submitting environment win (${VAR:-default}), so a
# site can override any of them with `export VAR=...` before sbatch. See docs/SLURM.md for each one.

# --- NCCL over InfiniBand / RoCE
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"            # use InfiniBand verbs when present
export NCCL_IB_HCA="${NCCL_IB_HCA:-}"                     # e.g. mlx5 : which HCAs (empty = all)
export NCCL_IB_GID_INDEX="${NCCL_IB_GID_INDEX:-}"         # RoCE only: the GID with IPv4 (often 3)
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"           # 4.096us * 2^22 ~ 17 s before an IB retry fails
# Topology (NCCL_SOCKET_IFNAME, NCCL_NET_GDR_LEVEL, NCCL_CROSS_NIC) and NCCL_IB_RETRY_CNT (7, its maximum)
# are left to NCCL's own detection; a site that needs them exports them before sbatch.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"                   # INFO prints the chosen transport per ring
export NCCL_DEBUG_SUBSYS="${NCCL_DEBUG_SUBSYS:-INIT,NET}"
# Fail fast instead of hanging until the collective timeout when a peer dies (torch >= 2.2 name).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_NCCL_BLOCKING_WAIT="${TORCH_NCCL_BLOCKING_WAIT:-0}"

# --- gloo (CPU runs and the CPU-side bootstrap)
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-}"       # e.g. ib0 or eth0 when hosts have several

# --- processes
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"  # one task's share of the cores
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # less fragmentation
export PYTHONUNBUFFERED=1                                                # log lines arrive as they happen

# Empty settings mean "let NCCL / gloo decide": drop them rather than pass an empty value.
for var in NCCL_IB_HCA NCCL_IB_GID_INDEX GLOO_SOCKET_IFNAME; do
    [ -n "${!var}" ] || unset "$var"
done
unset var
