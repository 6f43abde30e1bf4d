"""GPFM (Generalizable Pathology Foundation Model) in JAX/Flax: see the README for the map of the package."""

from gpfm_jax._platforms import quiet_libtpu_without_tpu as _quiet_libtpu_without_tpu

_quiet_libtpu_without_tpu()
