"""gpfm-bench: the benchmark as one command — encoders x tasks -> per-task metrics with CIs and a ranking with its
uncertainty (a joint, paired bootstrap over patients, vectorised with JAX). docs/benchmark.md describes it.

Modules, each importing only those listed before it: `weighted` (metrics under integer row weights) < `bootstrap`
(tasks cut into columns, batches of replicates) < `ranking` (ranks, average rank, P(first), win matrix) < `stats`
(Friedman / Nemenyi); `suite` (the TOML schema), `cache` (content keys, the store), `synthetic` (known-truth encoders
and datasets) < `datasets` (items, labels, content hashes) < `features` (encoders resolved and converted, features
extracted through gpfm_jax.extract) < `tasks` (one cell through gpfm_jax.evaluation) < `run`; `plots` (the
pictures) < `report` (tables, ranking) < `cli`.
"""
