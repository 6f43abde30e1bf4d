"""python -m gpfm_jax.bench"""

import sys

from gpfm_jax.bench.cli import main

sys.exit(main())
