"""The XLA flags of every program the suite compiles on the CPU, in pytest's processes (conftest.py) and in those the
tests start (helpers_train.py, test_extract_multi.py, tools/soak.py through its `xla_flags`): compiling is most of
what the suite does, so it is made cheap, and IEEE fp32 is kept (no fast math).
- LLVM at -O0 without its expensive passes: a cold tiny gpfm-train run 16 s instead of 28 s.
- XLA's classic elemental emitters instead of the MLIR fusion emitters, and one LLVM module per program (the
  processes keep to one core each): the tiny config's 1-device step compiles in 5.4 s instead of 10.6 s, and runs
  0.78 s instead of 0.64 s (tools/bench_compile_flags.py).
XLA's HLO passes (fusion, layout, algebraic simplification) are unchanged. No imports: conftest.py reads it before
jax starts. Runs that are compared bitwise must be compiled alike."""

FAST_COMPILE = ("--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0 "
                "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
