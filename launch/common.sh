# shellcheck shell=bash
# launch/common.sh — shared logic of the qlaunch launch scripts. Sourced, not run.
#
# Each launch script is two lines:
#     source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#     qlaunch_main METHOD MODE "$@"
# METHOD  qlora | lora           → --use_lora True --q_lora True|False + recipes/METHOD-default.yaml
# MODE    single                 → one process: `python finetune.py …` (no torchrun)
#         dist                   → torchrun over NNODES × processes-per-node (DeepSpeed ZeRO-2
#                                  by default); one process in total → plain python, like single
#         slurm                  → inside an sbatch allocation: one torchrun per node via srun
#
# Hyperparameters live in the YAML recipe, not here. This file only parses flags, chooses
# the process count and the rendezvous, prints the exact command and execs it.

QLAUNCH_ROOT="${QLAUNCH_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

_ql_usage() {
    local defaults
    case "$QL_MODE" in
        single) defaults="one process: python finetune.py (no torchrun, no DeepSpeed unless --deepspeed)";;
        dist)   defaults="torchrun on NNODES x processes-per-node; DeepSpeed $QL_DEFAULT_DS_REL";;
        slurm)  defaults="sbatch: one torchrun per allocated node via srun, c10d rendezvous";;
    esac
    cat <<EOF
Usage: $QL_PROG -m MODEL -d DATA [options] [-- FINETUNE_FLAGS...]
       $QL_PROG -c RECIPE.yaml [options] [-- FINETUNE_FLAGS...]

${QL_METHOD_NAME} fine-tuning with finetune.py; $defaults.

Options:
  -m, --model PATH_OR_ID     base model (--model_name_or_path)
  -d, --data PATH            training data .json/.jsonl (--data_path)
  -c, --config RECIPE.yaml   recipe (keys = finetune.py flags); replaces the default
                             $QL_DEFAULT_RECIPE_REL
      --deepspeed CONFIG     DeepSpeed JSON (ds_configs/zero{2,3}[_offload].json), or 'none'
                             (default: ${QL_DEFAULT_DS_REL:-none})
  -o, --output_dir DIR       where the adapter, checkpoints and report go
                             (default: $QL_DEFAULT_OUT, or the recipe's output_dir with -c)
  -h, --help                 this help
  --                         everything after it goes to finetune.py verbatim (the last
                             value of a flag wins), e.g. -- --max_steps 10 --learning_rate 1e-4

Without -c, -m and -d are required. finetune.py is given, in this order:
  --config RECIPE --model_name_or_path M --data_path D --use_lora True --q_lora ${QL_QLORA}
  [--output_dir O] [--deepspeed CONFIG]${QL_SLURM_RESUME_NOTE} [FINETUNE_FLAGS...]

Environment:
  NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1 on one node; required with NNODES>1)
  MASTER_PORT (a free port on one node; 29500 with NNODES>1)
  GPUS_PER_NODE   processes per node on GPU machines (default: nvidia-smi -L, respecting
                  CUDA_VISIBLE_DEVICES)
  NPROC_PER_NODE  processes per node, overrides everything (without a GPU: CPU processes
                  with gloo, default 1; finetune.py sets use_cpu and gloo itself)
  MAX_RESTARTS    torchrun --max_restarts; > 0 switches to c10d rendezvous (RDZV_ID names it)
  PYTHON          interpreter (default: python, else python3 on PATH)
  OMP_NUM_THREADS on CPU defaults to CPUs / processes per node
  QLAUNCH_PRINT_ONLY=1  print the command and exit without running it
EOF
    if [ "$QL_MODE" = slurm ]; then
        cat <<EOF

SLURM: sbatch [--nodes=N] [--gres=gpu:G] $QL_PROG -m MODEL -d DATA [...]
  One torchrun per node (srun --ntasks-per-node=1), c10d rendezvous on the NodeAddr of the
  first host of the allocation (override: RDZV_HOST, RDZV_PORT; an inherited MASTER_ADDR/
  MASTER_PORT/NNODES is ignored), RDZV id = job id. Processes per node: NPROC_PER_NODE, else
  GPUS_PER_NODE, else SLURM_GPUS_ON_NODE, else nvidia-smi -L on the batch host, else 1
  (CPU; OMP_NUM_THREADS = SLURM_CPUS_ON_NODE / processes). Preemption: SLURM sends SIGUSR1
  120 s before the end (--signal=USR1@120); finetune.py checkpoints, stops and requeues the
  job (--requeue); a requeued run (SLURM_RESTART_COUNT>0) gets --resume_from_checkpoint auto.
EOF
    fi
}

_ql_die() {
    echo "$QL_PROG: $*" >&2
    echo >&2
    _ql_usage >&2
    exit 2
}

_ql_note() { echo "[qlaunch $(date '+%F %T')] $*" >&2; }

_ql_set() {  # _ql_set FLAG VALUE
    local flag="$1" value="$2"
    [ -n "$value" ] || _ql_die "option $flag needs a non-empty value"
    case "$flag" in
        -m|--model) QL_MODEL="$value";;
        -d|--data) QL_DATA="$value";;
        -c|--config) QL_CONFIG="$value";;
        --deepspeed) QL_DS="$value"; QL_DS_SET=1;;
        -o|--output_dir|--output-dir) QL_OUT="$value";;
    esac
}

_ql_parse() {
    QL_MODEL="" QL_DATA="" QL_CONFIG="" QL_DS="" QL_DS_SET=0 QL_OUT=""
    QL_EXTRA=()
    while [ "$#" -gt 0 ]; do
        case "$1" in
            -h|--help) _ql_usage; exit 0;;
            -m|--model|-d|--data|-c|--config|--deepspeed|-o|--output_dir|--output-dir)
                if [ "$#" -lt 2 ] || { [ "${2:0:1}" = "-" ] && [ "${#2}" -gt 1 ]; }; then
                    _ql_die "option $1 needs a value"
                fi
                _ql_set "$1" "$2"; shift 2;;
            --model=*|--data=*|--config=*|--deepspeed=*|--output_dir=*|--output-dir=*)
                _ql_set "${1%%=*}" "${1#*=}"; shift;;
            --) shift; QL_EXTRA=("$@"); break;;
            -*) _ql_die "unknown option: $1";;
            *) _ql_die "unexpected argument: $1 (finetune.py flags go after --)";;
        esac
    done
    if [ -z "$QL_CONFIG" ]; then
        [ -n "$QL_MODEL" ] || _ql_die "-m/--model is required (or give a recipe with -c)"
        [ -n "$QL_DATA" ] || _ql_die "-d/--data is required (or give a recipe with -c)"
    elif [ ! -f "$QL_CONFIG" ]; then
        _ql_die "--config: no such file: $QL_CONFIG"
    fi
    if [ "$QL_DS" = none ] || [ "$QL_DS" = "" ]; then
        QL_DS=""
    elif [ ! -f "$QL_DS" ]; then
        _ql_die "--deepspeed: no such file: $QL_DS (see $QLAUNCH_ROOT/ds_configs/)"
    fi
}

_ql_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    command -v python 2>/dev/null || command -v python3 2>/dev/null || {
        echo "$QL_PROG: no python on PATH; set PYTHON=/path/to/python" >&2; exit 1; }
}

_ql_free_port() {  # a free TCP port on address $1 (default 127.0.0.1)
    "$QL_PY" -c 'import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1]); s.close()' "${1:-127.0.0.1}"
}

_ql_is_loopback() {
    case "$1" in 127.*|localhost|::1) return 0;; *) return 1;; esac
}

_ql_gpu_count() {  # GPUs this process may use: nvidia-smi -L, capped by CUDA_VISIBLE_DEVICES
    local n=0 visible
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
        visible="${CUDA_VISIBLE_DEVICES// /}"
        if [ -z "$visible" ] || [ "$visible" = "-1" ] || [ "$visible" = "NoDevFiles" ]; then
            n=0
        else
            local commas="${visible//[^,]/}"
            local v=$(( ${#commas} + 1 ))
            [ "$v" -lt "$n" ] && n=$v
        fi
    fi
    echo "${n:-0}"
}

_ql_positive_int() {  # _ql_positive_int NAME VALUE
    case "$2" in ''|*[!0-9]*|0) _ql_die "$1 must be a positive integer, got '$2'";; esac
}

# Decide processes per node → QL_NPROC, QL_GPUS (detected), QL_DEVICE (gpu|cpu).
_ql_nproc() {
    QL_GPUS=$(_ql_gpu_count)
    local slurm_gpus="${SLURM_GPUS_ON_NODE:-}"
    if [ "$QL_MODE" = slurm ] && [ -n "$slurm_gpus" ] && [ "$QL_GPUS" -eq 0 ]; then
        QL_GPUS="$slurm_gpus"
    fi
    if [ "$QL_GPUS" -gt 0 ]; then QL_DEVICE=gpu; else QL_DEVICE=cpu; fi
    if [ -n "${NPROC_PER_NODE:-}" ]; then
        QL_NPROC="$NPROC_PER_NODE"
    elif [ -n "${GPUS_PER_NODE:-}" ]; then
        QL_NPROC="$GPUS_PER_NODE"
    elif [ "$QL_GPUS" -gt 0 ]; then
        QL_NPROC="$QL_GPUS"
    else
        QL_NPROC=1
    fi
    _ql_positive_int "processes per node (NPROC_PER_NODE/GPUS_PER_NODE)" "$QL_NPROC"
    if [ "$QL_DEVICE" = cpu ]; then
        if [ -z "${OMP_NUM_THREADS:-}" ]; then
            local cpus="${SLURM_CPUS_ON_NODE:-$(nproc 2>/dev/null || echo 1)}"
            local t=$(( cpus / QL_NPROC )); [ "$t" -ge 1 ] || t=1
            export OMP_NUM_THREADS="$t"
        fi
        _ql_note "no GPU found: $QL_NPROC CPU process(es) per node (finetune.py sets use_cpu, gloo), OMP_NUM_THREADS=$OMP_NUM_THREADS"
    fi
}

# finetune.py and its arguments → QL_FT (array)
_ql_finetune_args() {
    local recipe="${QL_CONFIG:-$QL_DEFAULT_RECIPE}"
    QL_FT=("$QLAUNCH_ROOT/finetune.py" --config "$recipe")
    [ -z "$QL_MODEL" ] || QL_FT+=(--model_name_or_path "$QL_MODEL")
    [ -z "$QL_DATA" ] || QL_FT+=(--data_path "$QL_DATA")
    QL_FT+=(--use_lora True --q_lora "$QL_QLORA")
    local out="$QL_OUT"
    if [ -z "$out" ] && [ -z "$QL_CONFIG" ]; then out="$QL_DEFAULT_OUT"; fi
    [ -z "$out" ] || QL_FT+=(--output_dir "$out")
    [ -z "$QL_DS" ] || QL_FT+=(--deepspeed "$QL_DS")
    if [ "$QL_MODE" = slurm ] && [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
        QL_FT+=(--resume_from_checkpoint auto)
    fi
    QL_FT+=("${QL_EXTRA[@]}")
}

_ql_exec() {  # print the exact command, then exec it (or stop there with QLAUNCH_PRINT_ONLY=1)
    local line
    line=$(printf '%q ' "$@")
    echo "+ ${line% }" >&2
    if [ "${QLAUNCH_PRINT_ONLY:-0}" = 1 ]; then exit 0; fi
    exec "$@"
}

# One process, no launcher. With DeepSpeed, give it the env a launcher would, on loopback:
# otherwise it falls back to mpi4py and takes MASTER_ADDR from `hostname -I`.
_ql_uses_deepspeed() {  # --deepspeed from the flag, after --, or in the recipe
    [ -n "$QL_DS" ] && return 0
    local a prev=""
    for a in "${QL_EXTRA[@]}"; do
        case "$a" in --deepspeed=?*) [ "${a#*=}" != none ] && return 0;; esac
        if [ "$prev" = --deepspeed ] && [ -n "$a" ] && [ "$a" != none ]; then return 0; fi
        prev="$a"
    done
    local recipe="${QL_CONFIG:-$QL_DEFAULT_RECIPE}"
    [ -f "$recipe" ] && grep -Eq '^deepspeed:[[:space:]]*[^[:space:]#~]' "$recipe" \
        && ! grep -Eq '^deepspeed:[[:space:]]*(null|none|""|'"''"')[[:space:]]*(#.*)?$' "$recipe"
}

_ql_run_single() {
    if _ql_uses_deepspeed; then
        export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1
        export MASTER_PORT="${MASTER_PORT:-$(_ql_free_port 127.0.0.1)}"
        _ql_note "single process with DeepSpeed: RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    fi
    _ql_exec "$QL_PY" "${QL_FT[@]}"
}

# torchrun's rendezvous arguments → QL_RDZV (array). Static unless MAX_RESTARTS > 0:
# static rendezvous hangs in init_process_group after a restart, c10d does not.
_ql_rdzv_args() {
    local restarts="${MAX_RESTARTS:-0}"
    case "$restarts" in ''|*[!0-9]*) _ql_die "MAX_RESTARTS must be a number, got '$restarts'";; esac
    QL_RDZV=(--nnodes="$NNODES" --nproc_per_node="$QL_NPROC")
    if [ "$QL_MODE" = slurm ] || [ "$restarts" -gt 0 ]; then
        QL_RDZV+=(--rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
                  --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-qlaunch}}" --max_restarts="$restarts")
        # Workers re-using the rendezvous TCPStore can read the previous attempt's keys after a
        # restart and hang in init_process_group (pytorch#135712); give them their own store.
        export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
    else
        QL_RDZV+=(--node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
    fi
    # Advertise loopback when the job is on loopback; else torch uses socket.getfqdn().
    if _ql_is_loopback "$MASTER_ADDR"; then QL_RDZV+=(--local_addr=127.0.0.1); fi
}

_ql_run_dist() {
    NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"
    _ql_positive_int NNODES "$NNODES"
    case "$NODE_RANK" in ''|*[!0-9]*) _ql_die "NODE_RANK must be a number, got '$NODE_RANK'";; esac
    [ "$NODE_RANK" -lt "$NNODES" ] || _ql_die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"
    _ql_nproc
    if [ "$NNODES" -eq 1 ] && [ "$QL_NPROC" -eq 1 ]; then
        _ql_note "world size 1: running finetune.py directly (no torchrun)"
        _ql_run_single
        return
    fi
    if [ "$NNODES" -gt 1 ]; then
        [ -n "${MASTER_ADDR:-}" ] || _ql_die "NNODES=$NNODES: set MASTER_ADDR to the address of node 0 (the same on every node)"
        MASTER_PORT="${MASTER_PORT:-29500}"
    else
        MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
        MASTER_PORT="${MASTER_PORT:-$(_ql_free_port "$MASTER_ADDR")}"
    fi
    _ql_rdzv_args
    _ql_note "torchrun: NNODES=$NNODES NODE_RANK=$NODE_RANK nproc_per_node=$QL_NPROC MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT deepspeed=${QL_DS:-none}"
    _ql_exec "$QL_PY" -m torch.distributed.run "${QL_RDZV[@]}" "${QL_FT[@]}"
}

# Inside sbatch: rendezvous on the first node's NodeAddr, one torchrun per node via srun.
_ql_run_slurm() {
    [ -n "${SLURM_JOB_ID:-}" ] || _ql_die "not inside a SLURM job: submit with sbatch $QL_PROG ..."
    NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
    NODE_RANK=0
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # The node's NodeAddr (what slurmd itself is reached on); defaults to the node name.
    addr=$(scontrol show node -o "$first" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
    # MASTER_ADDR/MASTER_PORT inherited from the submitting shell say nothing about this
    # allocation: ignore them. RDZV_HOST / RDZV_PORT override on purpose.
    MASTER_ADDR="${RDZV_HOST:-${addr:-$first}}"
    MASTER_PORT="${RDZV_PORT:-}"
    if [ -z "$MASTER_PORT" ]; then
        # The batch script runs on the first node: probe a free port there.
        MASTER_PORT=$(_ql_free_port "$MASTER_ADDR" 2>/dev/null || echo $(( 20000 + SLURM_JOB_ID % 10000 )))
    fi
    export MASTER_ADDR MASTER_PORT
    _ql_nproc
    _ql_rdzv_args
    _ql_note "SLURM job $SLURM_JOB_ID start: nodes=$NNODES ($SLURM_JOB_NODELIST) nproc_per_node=$QL_NPROC rendezvous=$MASTER_ADDR:$MASTER_PORT (first host $first) restart=${SLURM_RESTART_COUNT:-0} deepspeed=${QL_DS:-none}"
    # torchrun ignores SIGUSR1 (SLURM's early-warning signal reaches every process of the
    # step); the workers install their own handler and checkpoint. An ignored signal
    # survives exec, so this has to happen in the process that execs torchrun.
    local cmd=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
               bash -c 'trap "" USR1; exec "$@"' qlaunch-node
               "$QL_PY" -m torch.distributed.run "${QL_RDZV[@]}" "${QL_FT[@]}")
    local line
    line=$(printf '%q ' "${cmd[@]}")
    echo "+ ${line% }" >&2
    [ "${QLAUNCH_PRINT_ONLY:-0}" = 1 ] && exit 0
    # srun in the background so that SIGTERM (scancel, preemption, requeue) is logged at once.
    local start=$SECONDS rc=0 pid
    "${cmd[@]}" &
    pid=$!
    trap '_ql_note "SLURM job $SLURM_JOB_ID: SIGTERM after $(( SECONDS - start )) s (cancelled, preempted or requeued); stopping"; kill -TERM "$pid" 2>/dev/null' TERM
    wait "$pid" || rc=$?
    if kill -0 "$pid" 2>/dev/null; then  # wait was interrupted by the trap: wait for srun itself
        rc=0; wait "$pid" || rc=$?
    fi
    trap - TERM
    _ql_note "SLURM job $SLURM_JOB_ID end: exit $rc after $(( SECONDS - start )) s"
    exit "$rc"
}

# qlaunch_main METHOD MODE ARGS...
qlaunch_main() {
    QL_METHOD="$1" QL_MODE="$2"; shift 2
    QL_PROG="${QL_PROG:-$(basename "$0")}"
    case "$QL_METHOD" in
        qlora) QL_QLORA=True QL_METHOD_NAME="Q-LoRA (LoRA on a 4-bit NF4/GPTQ base)";;
        lora)  QL_QLORA=False QL_METHOD_NAME="LoRA";;
        *) echo "qlaunch_main: bad method $QL_METHOD" >&2; exit 1;;
    esac
    QL_DEFAULT_RECIPE="$QLAUNCH_ROOT/recipes/$QL_METHOD-default.yaml"
    QL_DEFAULT_RECIPE_REL="recipes/$QL_METHOD-default.yaml"
    QL_DEFAULT_OUT="output_$QL_METHOD"
    QL_DEFAULT_DS_REL=""
    QL_SLURM_RESUME_NOTE=""
    [ "$QL_MODE" = dist ] && QL_DEFAULT_DS_REL="ds_configs/zero2.json"
    [ "$QL_MODE" = slurm ] && QL_SLURM_RESUME_NOTE=" [--resume_from_checkpoint auto, when requeued]"
    _ql_parse "$@"
    if [ "$QL_DS_SET" = 0 ] && [ -n "$QL_DEFAULT_DS_REL" ]; then
        QL_DS="$QLAUNCH_ROOT/$QL_DEFAULT_DS_REL"
    fi
    QL_PY=$(_ql_python)
    # Tools the run spawns (ninja for DeepSpeed's JIT ops, torchrun's workers) come from the
    # interpreter's environment first, as if it were activated.
    case "$QL_PY" in */*) PATH="$(dirname "$QL_PY"):$PATH"; export PATH;; esac
    _ql_finetune_args
    case "$QL_MODE" in
        single)
            QL_GPUS=$(_ql_gpu_count)
            if [ "$QL_GPUS" -gt 1 ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
                export CUDA_VISIBLE_DEVICES=0  # one GPU, like Qwen's single-GPU script
                _ql_note "several GPUs: using GPU 0 (CUDA_VISIBLE_DEVICES=0)"
            fi
            _ql_run_single;;
        dist) _ql_run_dist;;
        slurm) _ql_run_slurm;;
        *) echo "qlaunch_main: bad mode $QL_MODE" >&2; exit 1;;
    esac
}
