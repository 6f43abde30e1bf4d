"""gpfm-extract: one embedding per tile, for tile folders / JSON indexes and for whole slides (CLAM-style HDF5).

    python -m gpfm_jax.extract --encoder BUNDLE_OR_CHECKPOINT --input PATH --out FILE.h5|DIR

Modules, one job each: `encoder` (bundle/checkpoint -> a uint8-batch -> features function, jitted over every local
device), `preprocess` (resize a tile as the bundle says), `inputs` (what --input is), `slide_io` (whole-slide tiling,
via gpfm_jax.data.slides), `loader` (threaded prefetch of batches), `h5out` (atomic HDF5 files, uploaded whole to a
bucket), `share` (this process's part of the input), `remote` (bounded download cache for slides in a bucket),
`runner` (the loops, resume, error handling), `cli` (argparse).
"""

from gpfm_jax.extract.encoder import FeatureEncoder, load_feature_encoder
from gpfm_jax.extract.runner import SlideOptions, extract_slides, extract_tiles

__all__ = ["FeatureEncoder", "SlideOptions", "extract_slides", "extract_tiles", "load_feature_encoder", "main"]


def main(argv=None) -> int:
    from gpfm_jax.extract.cli import main as _main

    return _main(argv)
