"""The end-of-run probe (train/probe.py): retrieval arithmetic on hand-made features, tiles from the sample slide,
and the whole probe on a tiny network (a collapsed network scores 0, identical features for query and tile score 1)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from conftest import DATA_DIR
from gpfm_jax.data.augment import MultiCropConfig
from gpfm_jax.data.normalize import normalize_pixels
from gpfm_jax.models.vit import ViTConfig, VisionTransformer
from gpfm_jax.train import probe


def test_retrieval_accuracy_hand_computed():
    db = np.eye(6, dtype=np.float32)
    queries = db[[0, 1, 2, 3]].copy()
    queries[1] = 0.6 * db[1] + 0.8 * db[4]  # most similar to tile 4: rank 2
    queries[3] = db[5]  # tile 5, not its source 3: rank > 5 (similarity 0 ties with 4 others)
    acc = probe.retrieval_accuracy(queries, db, np.array([0, 1, 2, 3]))
    assert acc == {"top1": 0.5, "top5": 0.75}
    # a collapsed network: every tile the same vector, every query ties with all tiles -> no hit
    same = np.ones((4, 3), np.float32) / np.sqrt(3)
    assert probe.retrieval_accuracy(same, np.ones((6, 3), np.float32) / np.sqrt(3), np.arange(4))["top5"] == 0.0


@pytest.fixture(scope="module")
def tiles():
    return probe.probe_tiles([str(DATA_DIR / "cmu_small_region.svs")], 64, 20.0, max_tiles=48)


def test_probe_tiles_from_the_sample_slide(tiles):
    assert tiles.shape == (48, 64, 64, 3) and tiles.dtype == np.uint8
    assert len({t.tobytes() for t in tiles}) == 48  # spread over the grid, no repeats
    assert tiles.mean() < 230  # tissue, not glass


def test_augmented_queries_are_augmented_views_of_their_tiles(tiles):
    crops = MultiCropConfig()
    views, sources = probe.augmented_queries(tiles, 20, crops, seed=0)
    assert views.shape == (20, 64, 64, 3) and views.dtype == np.float32
    assert len(set(sources.tolist())) == 20
    plain = normalize_pixels(tiles[sources], crops.mean, crops.std)
    assert not np.allclose(views, plain, atol=0.05)  # cropped and colour-jittered
    again, _ = probe.augmented_queries(tiles, 20, crops, seed=0)
    np.testing.assert_array_equal(views, again)  # deterministic in the seed


def test_run_probe_on_a_tiny_network(tiles):
    vit = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, layerscale_init=None)
    backbone = VisionTransformer(vit)
    params = backbone.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))["params"]
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(__import__("flax").linen.meta.unbox(params)))
    collapsed = jax.tree_util.tree_map(np.zeros_like, params)  # every input -> the same CLS
    cfg = dataclasses.replace(probe.ProbeConfig(enabled=True), queries=24, batch_size=16)
    # no augmentation at all (identity crop, no colour ops): the random network finds every tile
    identity = MultiCropConfig(global_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                               blur_p_global2=0.0, solarize_p_global2=0.0)
    out = probe.run_probe(cfg, backbone, params, collapsed, tiles, identity)
    assert out["probe/top1/pretrained"] == 1.0 and out["probe/top1/init"] == 0.0
    assert out["probe/tiles"] == 48 and out["probe/queries"] == 24 and out["probe/chance"] == pytest.approx(1 / 48)
