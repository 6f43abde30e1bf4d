"""GPFM losses against NumPy references written from SPEC.md's formulas, plus hand-checkable cases."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpfm_jax import losses

TOL = dict(rtol=1e-5, atol=1e-5)


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ce(p, student_logits, temp=0.1):
    """Batch mean of -sum_k p log softmax(s / temp)."""
    return float(np.mean(-(p * np_log_softmax(student_logits / temp)).sum(-1)))


# ----------------------------------------------------------------------------------------------- centering


def test_centered_softmax_and_center_update():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(6, 32)).astype(np.float32)
    c = rng.normal(size=(32,)).astype(np.float32) * 0.1
    probs = losses.centered_softmax(t, c, 0.04)
    np.testing.assert_allclose(probs, np_softmax((t - c) / 0.04), **TOL)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, **TOL)
    new = losses.update_center(jnp.asarray(c), losses.batch_mean(t), momentum=0.9)
    np.testing.assert_allclose(new, 0.9 * c + 0.1 * t.mean(0), **TOL)
    valid = np.array([1, 0, 1, 1, 0, 0], bool)
    np.testing.assert_allclose(losses.batch_mean(t, valid), t[valid].mean(0), **TOL)
    assert losses.init_center(32).shape == (32,) and not np.any(losses.init_center(32))
    # the dispatching helper: this step's targets use the OLD center, the new one is for the next step
    probs2, new2 = losses.teacher_targets(t, jnp.asarray(c), 0.04, "centering", 0.9)
    np.testing.assert_allclose(probs2, probs, **TOL)
    np.testing.assert_allclose(new2, new, **TOL)
    sk, same = losses.teacher_targets(t, jnp.asarray(c), 0.04, "sinkhorn_knopp")
    np.testing.assert_allclose(sk, np_sinkhorn(t, 0.04), **TOL)
    np.testing.assert_array_equal(same, c)


def np_sinkhorn(t, temp, iters=3):
    """DINOv2 sinkhorn_knopp_teacher on one device, Q as K x B."""
    q = np.exp(t / temp).T.astype(np.float64)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(1, keepdims=True)
        q /= k
        q /= q.sum(0, keepdims=True)
        q /= b
    q *= b
    return q.T


def test_sinkhorn_knopp_matches_reference_and_ignores_padding():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(10, 24)).astype(np.float32) * 0.1
    out = np.asarray(losses.sinkhorn_knopp(t, 0.07, n_iterations=3))
    np.testing.assert_allclose(out, np_sinkhorn(t, 0.07), **TOL)
    np.testing.assert_allclose(out.sum(-1), 1.0, **TOL)  # each sample is a distribution
    # padding rows: zero targets, and the valid rows equal Sinkhorn on the valid rows alone
    padded = np.concatenate([t, rng.normal(size=(4, 24)).astype(np.float32)])
    valid = np.arange(14) < 10
    out_p = np.asarray(losses.sinkhorn_knopp(padded, 0.07, valid=valid))
    np.testing.assert_allclose(out_p[:10], out, **TOL)
    assert np.all(out_p[10:] == 0)
    # logits around 5 at tau 0.04 overflow a plain float32 exp (e^125); the global-max shift changes nothing else
    big = t + 5.0
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(big / np.float32(0.04))).any()
    np.testing.assert_allclose(losses.sinkhorn_knopp(big, 0.04), np_sinkhorn(t, 0.04), **TOL)
    # absurd logits: rows may underflow to 0 but nothing is NaN
    assert np.all(np.isfinite(np.asarray(losses.sinkhorn_knopp(t * 1000, 0.04))))


# ----------------------------------------------------------------------------------------------------- DINO


def np_dino(student_global, student_local, teacher_probs, temp=0.1):
    """SPEC: every student view (globals then locals) vs every teacher global view except the same view; average."""
    views = list(student_global) + list(student_local)
    terms = []
    for s, logits in enumerate(views):
        for t in range(teacher_probs.shape[0]):
            if s == t:  # student view s < G is global view s
                continue
            terms.append(ce(teacher_probs[t], logits, temp))
    return float(np.mean(terms)), len(terms)


def test_dino_loss_matches_18_pair_reference():
    rng = np.random.default_rng(2)
    b, k = 3, 16
    sg = rng.normal(size=(2, b, k)).astype(np.float32)
    sl = rng.normal(size=(8, b, k)).astype(np.float32)
    tp = np_softmax(rng.normal(size=(2, b, k)) / 0.5).astype(np.float32)
    ref, n_pairs = np_dino(sg, sl, tp)
    assert n_pairs == 18
    np.testing.assert_allclose(losses.dino_loss(sg, tp, sl, student_temp=0.1), ref, **TOL)
    # no local crops: the 2 global pairs only
    np.testing.assert_allclose(losses.dino_loss(sg, tp, None), np_dino(sg, [], tp)[0], **TOL)
    # crop-major flat batches reshape to [V, B, K]
    np.testing.assert_array_equal(losses.split_views(jnp.asarray(sl.reshape(8 * b, k)), 8), sl)


def test_dino_loss_identical_student_and_teacher_is_teacher_entropy():
    rng = np.random.default_rng(3)
    p = np_softmax(rng.normal(size=(4, 32))).astype(np.float32)
    tp = np.stack([p, p])
    student = 0.1 * np.log(p)  # log_softmax(student / 0.1) == log p
    sg, sl = np.stack([student] * 2), np.stack([student] * 8)
    entropy = float(np.mean(-(p * np.log(p)).sum(-1)))
    np.testing.assert_allclose(losses.dino_loss(sg, tp, sl), entropy, **TOL)
    # uniform student -> log K whatever the teacher
    np.testing.assert_allclose(losses.dino_loss(np.zeros_like(sg), tp, np.zeros_like(sl)), math.log(32), **TOL)


# ----------------------------------------------------------------------------------------------------- iBOT


def np_ibot(student, teacher_probs, masks, temp=0.1):
    """SPEC: per image mean CE over its masked patches (0 if none); then the mean over all global crops."""
    per_image = []
    for i in range(masks.shape[0]):
        m = masks[i]
        per_image.append(ce(teacher_probs[i][m], student[i][m], temp) if m.any() else 0.0)
    return float(np.mean(per_image))


@pytest.fixture
def ibot_case():
    rng = np.random.default_rng(4)
    n_img, n_tok, k = 4, 6, 16
    s = rng.normal(size=(n_img, n_tok, k)).astype(np.float32)
    tp = np_softmax(rng.normal(size=(n_img, n_tok, k))).astype(np.float32)
    masks = np.array([[1, 1, 0, 0, 0, 1], [0] * 6, [1, 0, 0, 0, 0, 0], [0] * 6], bool)  # 2 of 4 crops unmasked
    return s, tp, masks


def test_ibot_dense_matches_reference(ibot_case):
    s, tp, masks = ibot_case
    np.testing.assert_allclose(losses.ibot_loss_dense(s, tp, masks), np_ibot(s, tp, masks), **TOL)


def test_ibot_gathered_buffer_equals_dense(ibot_case):
    s, tp, masks = ibot_case
    max_masked = 7  # 4 masked tokens + 3 padding rows
    sel_s, w, valid = losses.select_masked(jnp.asarray(s), jnp.asarray(masks), max_masked)
    sel_t, _, _ = losses.select_masked(jnp.asarray(tp), jnp.asarray(masks), max_masked)
    np.testing.assert_array_equal(valid, [1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 1.0, 0, 0, 0], **TOL)
    np.testing.assert_allclose(sel_s[:4], s[masks], **TOL)
    fn = jax.jit(lambda a, b, c: losses.ibot_loss(a, b, c, num_images=masks.shape[0]))
    np.testing.assert_allclose(fn(sel_s, sel_t, w), np_ibot(s, tp, masks), **TOL)


def test_ibot_uniform_student_counts_unmasked_images_as_zero(ibot_case):
    _, tp, masks = ibot_case
    # CE = log K for each image with a mask, 0 for the two unmasked ones, averaged over all 4 crops
    np.testing.assert_allclose(losses.ibot_loss_dense(np.zeros_like(tp), tp, masks), math.log(16) * 2 / 4, **TOL)


# ---------------------------------------------------------------------------------------------------- KoLeo


def np_koleo(x, eps=1e-8):
    """SPEC: -mean log(||x_i - x_nn(i)|| + eps) on L2-normalised vectors, neighbour within the batch, not self."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    out = []
    for i in range(len(x)):
        d = [np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i]
        out.append(-np.log(min(d) + eps))
    return float(np.mean(out))


def test_koleo_matches_reference_and_groups():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    np.testing.assert_allclose(losses.koleo_loss(x), np_koleo(x), **TOL)
    np.testing.assert_allclose(losses.koleo_loss(x, num_groups=2), (np_koleo(x[:4]) + np_koleo(x[4:])) / 2, **TOL)
    views = rng.normal(size=(2, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(losses.koleo_global_views(views), np_koleo(views[0]) + np_koleo(views[1]), **TOL)


def test_koleo_square_corners():
    # the 4 corners of a square, scaled differently (normalisation removes it): neighbours are adjacent corners
    # 90 degrees apart on the unit circle, distance sqrt(2)
    x = np.array([[1, 1], [-2, 2], [-3, -3], [0.5, -0.5]], np.float32)
    np.testing.assert_allclose(losses.koleo_loss(x), -math.log(math.sqrt(2) + 1e-8), **TOL)


def test_koleo_duplicates_give_finite_gradient():
    x = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # exact distances (pairwise_eps=False): the duplicates are at distance 0
    np.testing.assert_allclose(losses.koleo_loss(x, pairwise_eps=False), np_koleo(np.asarray(x)), **TOL)
    # DINOv2's torch.nn.PairwiseDistance(eps=1e-8): ||x - y + eps|| = eps * sqrt(2) for the duplicates
    expected = np.mean([-math.log(1e-8 * math.sqrt(2) + 1e-8)] * 2 + [-math.log(math.sqrt(2) + 1e-8)])
    np.testing.assert_allclose(losses.koleo_loss(x), expected, **TOL)
    for exact in (True, False):
        grad = jax.grad(lambda y: losses.koleo_loss(y, pairwise_eps=exact))(x)  # noqa: B023
        assert np.all(np.isfinite(np.asarray(grad)))


# ------------------------------------------------------------------------------------------------- distill


def np_cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def np_smooth_l1(a, b, beta=1.0):
    d = np.abs(a - b)
    return float(np.mean(np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)))


def test_distill_losses_match_reference():
    rng = np.random.default_rng(6)
    pred = rng.normal(size=(3, 5, 8)).astype(np.float32)
    target = rng.normal(size=(3, 5, 8)).astype(np.float32) * 2
    np.testing.assert_allclose(losses.cosine_loss(pred[:, 0], target[:, 0]), 1 - np_cos(pred[:, 0], target[:, 0]).mean(), **TOL)
    ref = 0.9 * (1 - np_cos(pred, target).mean()) + 0.1 * np_smooth_l1(pred, target)
    np.testing.assert_allclose(losses.patch_distill_loss(pred, target), ref, **TOL)


def test_distill_hand_cases():
    x = np.array([[1.0, 2.0, -1.0]], np.float32)
    np.testing.assert_allclose(losses.cosine_loss(x, 3 * x), 0.0, atol=1e-6)
    np.testing.assert_allclose(losses.cosine_loss(x, -x), 2.0, **TOL)
    np.testing.assert_allclose(losses.patch_distill_loss(x[None], x[None]), 0.0, atol=1e-6)
    # SmoothL1(beta 1): |d| = 0.5 -> 0.125, |d| = 2 -> 1.5
    np.testing.assert_allclose(losses.smooth_l1(np.array([0.5, 2.0]), np.zeros(2)), (0.125 + 1.5) / 2, **TOL)


def test_weights_and_weighted_total():
    cfg = losses.LossConfig()
    w = losses.loss_weights(cfg)
    assert w == {
        "dino": 1.0, "ibot": 1.0, "koleo": 0.1,
        "distill/uni/cls": 1.0, "distill/phikon/cls": 0.5, "distill/conch/cls": 1.0,
        "distill/uni/patch": 0.25, "distill/phikon/patch": 0.125,
    }
    terms = {k: jnp.asarray(float(i + 1)) for i, k in enumerate(w)}
    total, metrics = losses.weighted_total(terms, w)
    np.testing.assert_allclose(total, sum(w[k] * (i + 1) for i, k in enumerate(w)), **TOL)
    assert metrics["loss/koleo"] == 3.0 and metrics["loss/total"] == total
    with pytest.raises(KeyError):
        losses.weighted_total({"unknown": jnp.ones(())}, w)


def test_distill_terms_per_teacher():
    rng = np.random.default_rng(8)
    dims = {"uni": 6, "phikon": 5, "conch": 4}
    cls_p = {t: rng.normal(size=(2, d)).astype(np.float32) for t, d in dims.items()}
    cls_t = {t: rng.normal(size=(2, d)).astype(np.float32) for t, d in dims.items()}
    pat_p = {t: rng.normal(size=(2, 4, dims[t])).astype(np.float32) for t in ("uni", "phikon")}
    pat_t = {t: rng.normal(size=(2, 4, dims[t])).astype(np.float32) for t in ("uni", "phikon")}
    terms = losses.distill_terms(cls_p, cls_t, pat_p, pat_t, losses.LossConfig())
    assert sorted(terms) == sorted(["distill/uni/cls", "distill/phikon/cls", "distill/conch/cls",
                                    "distill/uni/patch", "distill/phikon/patch"])
    np.testing.assert_allclose(terms["distill/conch/cls"], 1 - np_cos(cls_p["conch"], cls_t["conch"]).mean(), **TOL)
    ref = 0.9 * (1 - np_cos(pat_p["uni"], pat_t["uni"]).mean()) + 0.1 * np_smooth_l1(pat_p["uni"], pat_t["uni"])
    np.testing.assert_allclose(terms["distill/uni/patch"], ref, **TOL)
