"""The XLA flags of every program the suite compiles on the CPU, in pytest's processes (conftest.py) and in those the
tests start (helpers_train.py, test_extract_multi.py, tools/soak.py through its `xla_flags`): compiling is most of
what the suite does, so it is made cheap, and IEEE fp32 is kept (no fast math).
- LLVM at -O0 without its expensive passes: a cold tiny gpfm-train run 16 s instead of 28 s.
- XLA's classic elemental emitters instead of the MLIR fusion emitters, and one LLVM module per program (no split
  for parallel codegen: 5.7 -> 5.1 s for one step program on one core): the demo step compiles in 3.1 s instead of
  8.2 s and runs 0.235 s instead of 0.207 s, with the same loss (tools/bench_compile_flags.py, docs/performance.md).
XLA's HLO passes (fusion, layout, algebraic simplification) are unchanged. No imports: conftest.py reads it before
jax starts. Runs that are compared bitwise must be compiled alike. The one home of these flags: tools/soak.py and
tools/bench_compile_flags.py read them from here too."""

CHEAP_LLVM = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
CLASSIC_EMITTERS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
FAST_COMPILE = f"{CHEAP_LLVM} {CLASSIC_EMITTERS}"  # the suite's
