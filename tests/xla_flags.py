"""The XLA flags of every program the suite compiles on the CPU, in pytest's processes (conftest.py) and in those the
tests start (helpers_train.py, test_extract_multi.py; tools/soak.py spells the same): LLVM at -O0 without its expensive
passes. XLA's HLO passes (fusion, layout, algebraic simplification) are unchanged and IEEE fp32 is kept; compiling
is most of what the suite does (a cold tiny gpfm-train run: 16 s instead of 28 s). No imports: conftest.py reads it
before jax starts. Runs that are compared bitwise must be compiled alike."""

FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
