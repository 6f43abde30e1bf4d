"""A TFDS builder that packs a folder of tiles into an ArrayRecord dataset (no TensorFlow needed).

The original encoded bytes are stored unchanged (no re-encoding, no quality loss); reading back goes through
sources.TfdsSource, which decodes with PIL so a bad record is skipped like a bad file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from gpfm_jax.data.sources import IMAGE_EXTENSIONS


class TileFolder(tfds.core.GeneratorBasedBuilder):
    """Builder `tile_folder`: one split ("train") with {"image": encoded bytes, "path": relative file path}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Tiles of a folder, stored as their original encoded bytes."}

    # tfds looks for a checksums file next to the builder's code through importlib_resources, which this environment
    # lacks (ModuleNotFoundError); a local builder has no download checksums, so say so directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def __init__(self, *, tile_dir: str | os.PathLike | None = None, **kwargs):
        self._tile_dir = None if tile_dir is None else Path(tile_dir)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Pathology tiles packed from a folder for gpfm_jax.",
            features=tfds.features.FeaturesDict(
                {
                    # Raw encoded bytes (JPEG/PNG/...): tfds' Image feature would need TensorFlow to re-encode.
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "path": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._tile_dir is None or not self._tile_dir.is_dir():
            raise FileNotFoundError(f"tile folder not found: {self._tile_dir}")
        return {"train": self._generate_examples(self._tile_dir)}

    def _generate_examples(self, root: Path):
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"no image files found in {root}")
        for p in files:
            rel = str(p.relative_to(root))
            yield rel, {"image": p.read_bytes(), "path": rel}


def build_tile_dataset(tile_dir: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    """Pack `tile_dir` into an ArrayRecord TFDS dataset under data_dir; returns the builder directory to pass to
    sources.TfdsSource(builder_dir=...)."""
    builder = TileFolder(tile_dir=tile_dir, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)
