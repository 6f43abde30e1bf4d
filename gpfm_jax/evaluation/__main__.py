import sys

from gpfm_jax.evaluation.cli import main

sys.exit(main())
