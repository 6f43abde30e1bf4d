"""gpfm-train, the run around the step: the config schema and its validation (`config_schema`, `config`), the loop
(`loop`, `main`), checkpoints, the data stream and prefetch, metrics one step behind, faults (signals, deadlines,
lost peers) and the multi-process runtime. The step's math (model, objective, optimiser, sharding) is
`gpfm_jax.step`, below this package: nothing there imports from here."""
