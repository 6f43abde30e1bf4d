"""A learning check a user can read: after a run, a frozen-feature probe of the EMA teacher against the same
architecture at its initialisation, on tiles of the run's own slides.

The task is DINO's copy detection at tile level: each query is an augmented view of a tile (the run's own global-crop
augmentation: a random resized crop of 32-100% of the tile, colour jitter, grayscale, blur, solarisation), and the
features must find the tile it came from among all tiles of the slides (cosine similarity of L2-normalised CLS
features, top-1 and top-5). A random network finds few (colour and texture statistics change under the
augmentation); a collapsed network finds none (every tile looks the same to it; ties count as misses); features that
learned what stays the same under augmentation — tissue structure — find many. It needs no labels, so it runs on
any slide.

Measured on the demo (docs/fidelity.md) next to a labelled task we tried first and dropped: telling the
magnification a tile was read at (20x/10x/5x) stays at chance for every model, because DINO's random resized crops
train exactly the scale invariance that task would need.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpfm_jax.data.augment import MultiCropConfig, multi_crop
from gpfm_jax.data.batch import GLOBAL_CROPS
from gpfm_jax.data.normalize import normalize_pixels


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The end-of-run probe (single-process runs on `data.source = "slides"`)."""

    enabled: bool = False
    max_tiles: int = 400  # database: at most this many tiles, spread evenly over the slides' tissue grid
    queries: int = 200  # augmented views, one each of as many database tiles
    seed: int = 0
    batch_size: int = 64


def probe_tiles(slide_paths: Sequence[str], tile_size: int, magnification: float, max_tiles: int,
                min_tissue: float = 0.5, cache_dir: str | None = None) -> np.ndarray:
    """uint8 [N, S, S, 3]: tissue tiles of the slides at the run's magnification, spread evenly over the grid."""
    from gpfm_jax.data.sources import SlideTileSource

    source = SlideTileSource(list(slide_paths), tile_size, magnification, cache_dir=cache_dir, min_tissue=min_tissue)
    index = np.linspace(0, len(source) - 1, min(max_tiles, len(source))).round().astype(int)
    return np.stack([source[int(i)]["image"] for i in index])


def augmented_queries(tiles: np.ndarray, count: int, crops: MultiCropConfig,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(f32 [Q, S, S, 3] ImageNet-normalised augmented views, int [Q] the tile each came from): the second global
    view of the run's multi-crop recipe (the one with blur and solarisation), at the tile size."""
    rng = np.random.default_rng(seed)
    sources = np.linspace(0, len(tiles) - 1, min(count, len(tiles))).round().astype(int)
    cfg = dataclasses.replace(crops, global_size=tiles.shape[1], num_local_crops=1)
    views = np.stack([multi_crop(tiles[i], rng, cfg)[GLOBAL_CROPS][1] for i in sources])
    return views, sources


def cls_features(backbone: Any, params: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """L2-normalised final-normed CLS features of normalised f32 NHWC images; one compiled batch shape."""
    forward = jax.jit(lambda p, x: backbone.apply({"params": p}, x)["cls"].astype(jnp.float32))
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - len(chunk)
        x = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
        out.append(np.asarray(forward(params, x))[: len(chunk)])
    feats = np.concatenate(out)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def retrieval_accuracy(query_feats: np.ndarray, db_feats: np.ndarray, sources: np.ndarray) -> dict[str, float]:
    """Top-1 / top-5: the query's source tile among the database's most similar (ties count as misses)."""
    sim = query_feats @ db_feats.T
    own = sim[np.arange(len(sources)), sources][:, None]
    rank = np.sum(sim >= own, axis=1)  # 1 = strictly the most similar (its own tile included in the count)
    return {"top1": float(np.mean(rank <= 1)), "top5": float(np.mean(rank <= 5))}


def run_probe(cfg: ProbeConfig, backbone: Any, trained: Any, init: Any, tiles: np.ndarray, crops: MultiCropConfig
              ) -> dict[str, float]:
    """{"probe/top1/pretrained", "probe/top1/init", "probe/top5/...", "probe/tiles", "probe/chance"}."""
    queries, sources = augmented_queries(tiles, cfg.queries, crops, cfg.seed)
    db = normalize_pixels(tiles, crops.mean, crops.std)
    out = {"probe/tiles": float(len(tiles)), "probe/queries": float(len(queries)), "probe/chance": 1.0 / len(tiles)}
    for name, params in (("pretrained", trained), ("init", init)):
        acc = retrieval_accuracy(cls_features(backbone, params, queries, cfg.batch_size),
                                 cls_features(backbone, params, db, cfg.batch_size), sources)
        out |= {f"probe/{k}/{name}": v for k, v in acc.items()}
    return out
