"""gpfm-bench: the benchmark as one command — encoders x tasks -> per-task metrics with CIs and a ranking with its
uncertainty (a joint, paired bootstrap over patients, vectorised with JAX).

Layers inside (each imports only those before it): `weighted` (metrics under integer row weights) < `bootstrap`
(packing tasks, replicates) < `ranking` (ranks, average rank, P(first), win matrix) and `stats` (Friedman /
Nemenyi) < `suite` (the suite file) < `cache` (content-addressed features and cells) < `tasks` (one encoder x task
through gpfm_jax.evaluation) < `synthetic` (known-truth encoders and datasets) < `run` < `report`, `plots` < `cli`.
"""
