"""python -m gpfm_jax.encoder_bench"""

import sys

from gpfm_jax.encoder_bench.cli import main

sys.exit(main())
