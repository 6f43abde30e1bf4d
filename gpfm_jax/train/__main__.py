"""`python -m gpfm_jax.train` = `gpfm-train`."""

from gpfm_jax.train.main import cli

cli()
