import sys

from gpfm_jax.data.index.cli import main

if __name__ == "__main__":
    sys.exit(main())
