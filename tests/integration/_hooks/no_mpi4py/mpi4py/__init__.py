# Test-only: put the parent directory first on PYTHONPATH to make `import mpi4py` fail,
# proving that single-process DeepSpeed runs never need MPI (STACK.md: without RANK/
# WORLD_SIZE/MASTER_* DeepSpeed falls back to mpi4py and `hostname -I`).
raise ImportError("mpi4py is blocked by qlaunch's integration tests (tests/integration/_hooks/no_mpi4py)")
