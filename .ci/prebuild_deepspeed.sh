#!/usr/bin/env bash
# Pre-build the DeepSpeed C++ ops that qlaunch runs need, into a persistent
# TORCH_EXTENSIONS_DIR, so test/CI reruns (and the first training step) don't pay
# the JIT compile. DeepSpeed 0.19.8 is installed as pure Python and JIT-compiles ops
# on first use. On a CPU-only host with the HF Trainer integration:
#
#   op                  when it is compiled                                  measured (2 cores)
#   deepspeed_shm_comm  every DeepSpeed run: deepspeed.comm's TorchBackend   see .ci/README or
#                       builds it in init_distributed (ZeRO-0/1/2/3)         the timings this prints
#   cpu_adam            ZeRO offload configs (ds_configs/*_offload.json):
#                       their "optimizer" block makes DeepSpeed use
#                       DeepSpeedCPUAdam
#
# ZeRO-2/3 *without* offload use the HF-created torch optimizer (no "optimizer"
# block in ds_configs/zero{2,3}.json), so only deepspeed_shm_comm is needed there.
#
# Usage:  bash .ci/prebuild_deepspeed.sh [OP ...]     (default: shm_comm cpu_adam)
#   OP is one of: shm_comm cpu_adam cpu_adagrad cpu_lion fused_adam
# Env:    TORCH_EXTENSIONS_DIR (default: $HOME/.cache/qlaunch/torch_extensions)
#         PYTHON (default: python3 on PATH, or /work/venv/bin/python if VIRTUAL_ENV unset)
#         MAX_JOBS (ninja parallelism; default: number of CPUs)
# A second run is a no-op (~seconds): torch's JIT loader reuses the cached .so when
# sources and flags are unchanged.
set -euo pipefail

export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/qlaunch/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$TORCH_EXTENSIONS_DIR"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then PY="$VIRTUAL_ENV/bin/python"
    else PY="$(command -v python3 || command -v python)"; fi
fi

# torch runs `ninja` from PATH. Use the interpreter's own bin dir first, like an activated
# venv: the pip `ninja` (1.13) and Debian's /usr/bin/ninja (1.11) hash build commands
# differently, so building with one and loading with the other recompiles every time.
PATH="$(dirname "$PY"):$PATH"
export PATH

if [ "$#" -eq 0 ]; then
    set -- shm_comm cpu_adam
fi

echo "prebuild_deepspeed: TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR ops: $*" >&2
exec "$PY" - "$@" <<'PYEOF'
import sys, time

t0 = time.time()
try:
    import deepspeed  # noqa: F401
except ImportError:
    print("prebuild_deepspeed: deepspeed is not installed; nothing to build", file=sys.stderr)
    sys.exit(0)
from deepspeed.accelerator import get_accelerator

BUILDERS = {
    "shm_comm": "ShareMemCommBuilder",
    "cpu_adam": "CPUAdamBuilder",
    "cpu_adagrad": "CPUAdagradBuilder",
    "cpu_lion": "CPULionBuilder",
    "fused_adam": "FusedAdamBuilder",
}
acc = get_accelerator()
print(f"prebuild_deepspeed: deepspeed {deepspeed.__version__}, accelerator {acc._name} "
      f"(import {time.time() - t0:.1f}s)", file=sys.stderr)
failed = []
for op in sys.argv[1:]:
    cls = BUILDERS.get(op)
    if cls is None:
        print(f"prebuild_deepspeed: unknown op {op!r}; choose from {sorted(BUILDERS)}", file=sys.stderr)
        sys.exit(2)
    builder = acc.create_op_builder(cls)
    if builder is None or not builder.is_compatible(False):
        print(f"prebuild_deepspeed: {op}: not compatible with accelerator {acc._name}, skipped",
              file=sys.stderr)
        continue
    t = time.time()
    try:
        builder.load(verbose=False)
    except Exception as e:  # keep going: report every op
        print(f"prebuild_deepspeed: {op}: FAILED after {time.time() - t:.1f}s: {e}", file=sys.stderr)
        failed.append(op)
        continue
    print(f"prebuild_deepspeed: {op} ({builder.NAME}) ready in {time.time() - t:.1f}s", file=sys.stderr)
sys.exit(1 if failed else 0)
PYEOF
