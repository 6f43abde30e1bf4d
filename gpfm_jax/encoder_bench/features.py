"""Encoders and their features, content-addressed (see `cache`).

An encoder of the suite resolves to a bundle folder (a bundle, a training checkpoint, or a PyTorch / safetensors
file converted on the fly by `gpfm_jax.convert` into the store, once per file content) and to a key: the hash of
its parameter arrays and architecture, the feature output, the compute dtype and the preprocessing. Features come
from gpfm-extract's own loops (`gpfm_jax.extract.runner.extract_tiles` / `extract_slides`); the encoder is loaded
(and compiled) only when some feature set is missing.

Slides are extracted into one folder per (encoder, tiling) key, one file per slide content hash; gpfm-extract names
an output after its slide's stem, so it is given links named by those hashes (kept in `.links/`, so the `slide`
attribute of each file still resolves). A killed extraction resumes at the first unfinished slide.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gpfm_jax.encoder_bench import synthetic
from gpfm_jax.encoder_bench.cache import Store, digest, tree_sha
from gpfm_jax.encoder_bench.datasets import SlideSet, TileSet
from gpfm_jax.encoder_bench.suite import DatasetSpec, EncoderSpec

log = logging.getLogger("gpfm_jax.encoder_bench")
Events = Callable[..., None]
_NOT_ARCH = ("provenance", "format", "version", "preprocessing", "training_input", "reference")


@dataclasses.dataclass
class Encoder:
    spec: EncoderSpec
    key: str  # what the features depend on: parameters, architecture, output, dtype, preprocessing
    path: Path | None  # bundle or checkpoint folder; None for a synthetic encoder
    info: dict[str, Any]  # recorded in the run: params hash, output, dtype, preprocessing, source
    _loaded: Any = None

    def load(self):
        """gpfm-extract's FeatureEncoder (loaded and compiled once, on first use)."""
        if self._loaded is None:
            from gpfm_jax.extract.encoder import load_feature_encoder

            self._loaded = load_feature_encoder(self.path, batch_size=self.spec.batch_size, dtype=self.spec.dtype,
                                                output=self.spec.output, step=self.spec.step)
        return self._loaded


def _params_sha(path: Path, step: int | None) -> str:
    from gpfm_jax.convert.bundle import load_bundle, load_meta
    from gpfm_jax.convert.student import is_training_checkpoint, load_student_encoder

    if is_training_checkpoint(path):
        params, _ = load_student_encoder(path, step)
        meta = load_meta(path)
    else:
        params, meta = load_bundle(path)
    return tree_sha(params, {k: v for k, v in meta.items() if k not in _NOT_ARCH})


def _convert(spec: EncoderSpec, store: Store, events: Events) -> Path:
    from gpfm_jax.convert.bundle import is_bundle

    weights = Path(spec.weights)
    if not weights.is_file():
        raise FileNotFoundError(f"encoders.{spec.name}.weights: {weights}: no such file")
    ckey = digest({"weights": store.hashes.file_sha(weights), "convert": spec.convert, "arch": spec.arch,
                   "num_heads": spec.num_heads})
    out = store.bundle_dir(ckey)
    if is_bundle(out):
        return out
    start = time.perf_counter()
    if spec.convert == "vit":
        from gpfm_jax.convert.student import convert_from_pytorch

        heads = {"num_heads": spec.num_heads} if spec.num_heads else {}
        convert_from_pytorch(weights, out, arch=spec.arch, **heads)
    else:
        from gpfm_jax.convert.teacher_port import port_teacher

        port_teacher(spec.convert, weights, out)
    events("convert", encoder=spec.name, key=ckey, source=str(weights), seconds=time.perf_counter() - start)
    return out


def resolve_encoder(spec: EncoderSpec, store: Store, events: Events) -> Encoder:
    """The encoder's content key (converting weight files into the store first). Errors name the suite field."""
    if spec.synthetic is not None:
        key = digest({"synthetic": spec.synthetic, "seed": spec.seed, "version": synthetic.GENERATOR_VERSION})
        return Encoder(spec, key, None, {"synthetic": spec.synthetic, "seed": spec.seed})
    from gpfm_jax.convert.bundle import load_meta, preprocessing

    from gpfm_jax import storage

    path = _convert(spec, store, events) if spec.weights else storage.resolve(spec.bundle)  # a folder or gs://
    if not path.is_dir():
        raise FileNotFoundError(f"encoders.{spec.name}.bundle: {path}: no such folder")
    meta = load_meta(path)  # CheckpointError (a ValueError) names the file
    sha = store.hashes.get(path, f"params@{spec.step}", lambda p: _params_sha(p, spec.step))
    prep = meta.get("preprocessing") or preprocessing(int(meta.get("vit", {}).get("img_size", 224)))
    output = spec.output or meta.get("feature") or meta.get("targets", {}).get("cls") or "cls"
    info = {"params_sha256": sha, "output": output, "dtype": spec.dtype, "preprocessing": prep,
            "source": str(spec.weights or spec.bundle), "bundle": str(path)}
    return Encoder(spec, digest({k: info[k] for k in ("params_sha256", "output", "dtype", "preprocessing")}), path,
                   info)


# ------------------------------------------------------------------------------------------------ tile features


def tile_features(enc: Encoder, ds: DatasetSpec, tiles: TileSet, store: Store, events: Events,
                  progress: bool = False) -> Path:
    """The tile set's feature file (features f32 [N, D], paths [N]), extracted unless cached."""
    key = digest({"encoder": enc.key, "tiles": tiles.content})
    out = store.tile_features(key)
    if out.is_file():
        events("features_cached", encoder=enc.spec.name, dataset=ds.name, key=key)
        return out
    start = time.perf_counter()
    if enc.path is None:
        _write_synthetic_tiles(out, ds, enc, tiles)
    else:
        from gpfm_jax.extract.inputs import TileInput
        from gpfm_jax.extract.runner import LoaderOptions, extract_tiles

        spec = TileInput(list(tiles.files), tiles.root, f"datasets.{ds.name}")
        result = extract_tiles(enc.load(), spec, out, LoaderOptions(progress=progress), overwrite=True)
        if result.failed:
            log.warning("datasets.%s: %d unreadable tile(s) left out, e.g. %s", ds.name, len(result.failed),
                        result.failed[0][0])
    events("extract", encoder=enc.spec.name, dataset=ds.name, key=key, items=len(tiles.ids),
           seconds=time.perf_counter() - start)
    return out


def _write_synthetic_tiles(out: Path, ds: DatasetSpec, enc: Encoder, tiles: TileSet) -> None:
    import h5py

    from gpfm_jax.extract.h5out import AtomicH5

    x = synthetic.tile_features(ds.synthetic, enc.spec.synthetic, enc.spec.seed)
    with AtomicH5(out, {"encoder": enc.spec.name, "kind": "tiles", "synthetic": True}) as h5:
        h5.create("features", (x.shape[1],), np.float32)
        h5.append("features", x)
        h5.create("paths", (), h5py.string_dtype())
        h5.append("paths", tiles.ids)


# ------------------------------------------------------------------------------------------------ slide features


def _tiling(ds: DatasetSpec) -> dict[str, Any]:
    if ds.kind == "synthetic":
        return {}
    return {"tile_size": ds.tile_size, "magnification": ds.magnification, "stride": ds.stride,
            "min_tissue": ds.min_tissue}


def slide_feature_keys(enc: Encoder, ds: DatasetSpec, slides: SlideSet) -> tuple[str, dict[str, str]]:
    """(folder key, {slide id: file stem}) of the dataset's slides for this encoder."""
    folder = digest({"encoder": enc.key, "tiling": _tiling(ds)})
    return folder, {s: slides.content[s][:40] for s in slides.slide_ids}


def slide_features(enc: Encoder, ds: DatasetSpec, slides: SlideSet, store: Store, events: Events,
                   progress: bool = False) -> Path:
    """A folder of `<slide_id>.h5` links (what gpfm-eval mil reads) to the cached per-slide features, extracting
    the missing slides first."""
    folder_key, stems = slide_feature_keys(enc, ds, slides)
    folder = store.slide_features_dir(folder_key)
    todo: dict[str, str] = {}  # file stem -> the first slide with that content (identical files extract once)
    for s in slides.slide_ids:
        if not (folder / f"{stems[s]}.h5").is_file():
            todo.setdefault(stems[s], s)
    missing = list(todo.values())
    if missing:
        start = time.perf_counter()
        if enc.path is None:
            _write_synthetic_slides(folder, ds, enc, slides, missing, stems)
        else:
            _extract_slides(folder, ds, enc, slides, missing, stems, progress)
        events("extract", encoder=enc.spec.name, dataset=ds.name, key=folder_key, items=len(missing),
               seconds=time.perf_counter() - start)
    else:
        events("features_cached", encoder=enc.spec.name, dataset=ds.name, key=folder_key)
    view = store.root / "views" / digest([folder_key, slides.slide_ids, stems])[:24]
    view.mkdir(parents=True, exist_ok=True)
    for s in slides.slide_ids:
        target = folder / f"{stems[s]}.h5"
        link = view / f"{s}.h5"
        if target.is_file() and not (link.is_symlink() and os.readlink(link) == os.path.relpath(target, view)):
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(target, view))
    return view


def _extract_slides(folder: Path, ds: DatasetSpec, enc: Encoder, slides: SlideSet, missing: list[str],
                    stems: dict[str, str], progress: bool) -> None:
    from gpfm_jax.extract.runner import LoaderOptions, SlideOptions, extract_slides

    links = folder / ".links"
    links.mkdir(parents=True, exist_ok=True)
    files = dict(zip(slides.slide_ids, slides.files))
    paths = []
    for s in missing:
        link = links / f"{stems[s]}{files[s].suffix}"
        if not link.is_symlink():
            link.symlink_to(files[s].absolute())
        paths.append(link)
    tiling = SlideOptions(tile_size=ds.tile_size, magnification=ds.magnification, stride=ds.stride,
                          min_tissue=ds.min_tissue)
    report = extract_slides(enc.load(), paths, folder, tiling, LoaderOptions(progress=progress))
    by_stem = {stems[s]: s for s in missing}
    for slide, reason in report.failed:
        log.warning("datasets.%s: slide %s could not be extracted and is left out: %s", ds.name,
                    by_stem.get(Path(slide).stem, slide), reason)


def _write_synthetic_slides(folder: Path, ds: DatasetSpec, enc: Encoder, slides: SlideSet, missing: list[str],
                            stems: dict[str, str]) -> None:
    from gpfm_jax.extract.h5out import AtomicH5

    index = {s: i for i, s in enumerate(slides.slide_ids)}
    for s in missing:
        x = synthetic.slide_features(ds.synthetic, enc.spec.synthetic, enc.spec.seed, index[s])
        with AtomicH5(folder / f"{stems[s]}.h5", {"encoder": enc.spec.name, "kind": "slide", "slide_id": s,
                                                  "synthetic": True}) as h5:
            h5.create("features", (x.shape[1],), np.float32)
            h5.append("features", x)
            h5.create("coords", (2,), np.int64, attrs={"patch_level": 0, "patch_size": 256})
            h5.append("coords", synthetic.slide_coords(len(x)))
