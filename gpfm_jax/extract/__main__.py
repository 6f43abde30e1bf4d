import sys

from gpfm_jax.extract.cli import main

sys.exit(main())
