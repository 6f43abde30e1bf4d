"""Compatibility: the shared config pieces now live in the package, `gpfm_jax.train.config_schema` (import them
from there: `from gpfm_jax.train.config_schema import base_config, vit`)."""

from gpfm_jax.train.config_schema import base_config, vit  # noqa: F401
