"""Memory-mapped tile indexes (`gpfm-index`): built once from the official JSON, a tile folder or a list of slides;
opened in milliseconds by every process (see store.py for the layout, docs/data.md for the workflow)."""

from gpfm_jax.data.index.build_files import build_from_folder, build_from_json
from gpfm_jax.data.index.build_slides import build_from_slides, read_slide_list
from gpfm_jax.data.index.packed import PackedSource, is_packed
from gpfm_jax.data.index.sources import SlideIndexSource, TileIndexSource
from gpfm_jax.data.index.store import IndexFormatError, TileIndex, is_index, read_manifest

__all__ = ["build_from_folder", "build_from_json", "build_from_slides", "read_slide_list", "PackedSource", "is_packed",
           "SlideIndexSource", "TileIndexSource", "IndexFormatError", "TileIndex", "is_index", "read_manifest"]
