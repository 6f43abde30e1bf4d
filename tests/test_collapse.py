"""Collapse detection (issue 21), the fast part: the step's collapse signals on hand-computed inputs (uniform ->
1, one-hot -> 0, identical features -> 0), their exactness under gradient accumulation, the detector's persistence
rule on a run's logged metrics, and config.sanity's validation. The real runs that produce each kind (and the
silent control) are in test_collapse_run.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpfm_jax.step import signals
from gpfm_jax.train import collapse
from gpfm_jax.train.config_schema import ConfigError, base_config, parse


def _finalized(probs, feats):
    return {k: float(v) for k, v in signals.finalize(signals.batch_moments(probs, feats)).items()}


def test_uniform_targets_read_one_everywhere():
    k = 64
    s = signals.target_signals(jnp.full((12, k), 1.0 / k))
    assert float(s["teacher_entropy"]) == pytest.approx(1.0, abs=1e-5)
    assert float(s["batch_entropy"]) == pytest.approx(1.0, abs=1e-5)
    assert float(s["prototypes_used"]) == pytest.approx(k, rel=1e-4)


def test_one_hot_targets_same_or_different_prototypes():
    k = 64
    same = jax.nn.one_hot(jnp.full((12,), 5), k)
    s = signals.target_signals(same)
    assert float(s["teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(s["batch_entropy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(s["prototypes_used"]) == pytest.approx(1.0, abs=1e-5)
    # a sharp but healthy teacher: one-hot per image, 4 different prototypes, 3 images each
    spread = jax.nn.one_hot(jnp.arange(12) % 4, k)
    s = signals.target_signals(spread)
    assert float(s["teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(s["batch_entropy"]) == pytest.approx(math.log(4) / math.log(k), rel=1e-5)
    assert float(s["prototypes_used"]) == pytest.approx(4.0, rel=1e-5)


def test_feature_spread_identical_zero_random_near_one():
    row = jax.random.normal(jax.random.key(0), (32,))
    assert float(signals.feature_spread(jnp.tile(row, (16, 1)) * jnp.arange(1, 17)[:, None])) == pytest.approx(
        0.0, abs=1e-5)  # the same direction at different norms: identical once normalised
    gauss = jax.random.normal(jax.random.key(1), (4096, 32))
    # unit vectors spread over the sphere: per-dimension std 1/sqrt(D) (minus the mean of |x_d| vs its rms)
    assert 0.97 < float(signals.feature_spread(gauss)) <= 1.0


def test_finalized_moments_equal_the_direct_signals_and_microbatch_means_the_full_batch():
    key1, key2 = jax.random.split(jax.random.key(2))
    probs = jax.nn.softmax(3.0 * jax.random.normal(key1, (16, 32)), -1)
    feats = jax.random.normal(key2, (16, 8)) + 0.5
    full = _finalized(probs, feats)
    direct = {**{k: float(v) for k, v in signals.target_signals(probs).items()},
              "cls_spread": float(signals.feature_spread(feats))}
    for name, value in direct.items():
        assert full[signals.PREFIX + name] == pytest.approx(value, rel=1e-5), name
    # two microbatches of 8, their moments averaged as the step's scan does: the full batch's signals
    halves = [signals.batch_moments(probs[i:i + 8], feats[i:i + 8]) for i in (0, 8)]
    averaged = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *halves)
    averaged |= {name: jnp.stack([h[name] for h in halves]) for name in signals.STACKED}
    for name, value in signals.finalize(averaged).items():
        assert float(value) == pytest.approx(full[name], rel=1e-5), name
    # nearly identical features (the case to measure): the pooled variance keeps its digits
    tight = jnp.ones((16, 8)) + 1e-3 * feats
    halves = [signals.batch_moments(probs[i:i + 8], tight[i:i + 8]) for i in (0, 8)]
    pooled = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *halves)
    pooled |= {name: jnp.stack([h[name] for h in halves]) for name in signals.STACKED}
    expected = float(signals.feature_spread(tight))
    assert 0 < expected < 0.01
    assert float(signals.finalize(pooled)[signals.PREFIX + "cls_spread"]) == pytest.approx(expected, rel=1e-4)
    assert set(full) == {signals.PREFIX + n for n in ("teacher_entropy", "batch_entropy", "prototypes_used",
                                                      "cls_spread")}


def _row(dino, ibot, distill, entropy, batch_entropy, spread, k=256):
    return {"loss/dino": dino * math.log(k), "loss/ibot": ibot, "loss/distill/uni/cls": distill,
            "collapse/teacher_entropy": entropy, "collapse/batch_entropy": batch_entropy,
            "collapse/prototypes_used": math.exp(batch_entropy * math.log(k)), "collapse/cls_spread": spread}


def test_detector_persistence_window_after_and_once_per_kind():
    """The persistence rule itself (the thresholds are calibrated on real runs: test_collapse_run.py, docs)."""
    det = collapse.CollapseDetector(256, collapse.CollapseSettings(window=3, after=2))
    uniform = _row(1.0, 2.7, 0.5, 0.99, 0.99, 0.5)
    healthy = _row(0.5, 1.0, 0.5, 0.3, 0.6, 0.5)
    out = [det.update(i, r) for i, r in enumerate([uniform, uniform, uniform, uniform, healthy, uniform, uniform,
                                                   uniform, uniform, uniform])]
    # iterations 0-1 before `after`; 2-3 uniform, broken at 4; 5-7 the first full window -> reported at 7, once
    assert [i for i, v in enumerate(out) if v] == [7]
    (verdict,) = out[7]
    assert verdict["kind"] == "uniform" and verdict["since"] == 5
    assert "uniform collapse since iteration 5" in verdict["message"] and "teacher_temp" in verdict["message"]
    assert verdict["numbers"]["teacher_entropy"] == pytest.approx(0.99)
    row = collapse.verdict_row(verdict, "warn")
    assert row["collapse_kind"] == "uniform" and row["action"] == "warn"


def test_config_sanity_fields_are_validated_with_their_names():
    c = base_config()
    assert (c.sanity.on_collapse, c.sanity.collapse_window, c.sanity.collapse_after) == ("warn", 50, 150)
    for field, value, message in (("on_collapse", "halt", r"config\.sanity: on_collapse='halt'"),
                                  ("collapse_window", 0, r"config\.sanity: collapse_window=0"),
                                  ("collapse_after", -1, r"config\.sanity: collapse_after=-1")):
        c = base_config()
        c.sanity[field] = value
        with pytest.raises(ConfigError, match=message):
            parse(c)
    c = base_config()
    c.sanity.on_collapse = "off"
    assert collapse.detector_for(parse(c)) is None
    c.sanity.on_collapse = "stop"
    assert isinstance(collapse.detector_for(parse(c)), collapse.CollapseDetector)
    np.testing.assert_equal(collapse.KINDS, ("uniform", "one_hot", "representation", "distill_only"))
