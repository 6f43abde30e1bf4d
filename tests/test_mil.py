"""Slide-level MIL: the Flax ABMIL / TransMIL forwards against torchmil's models and the TransMIL paper's layout
(lucidrains' nystrom-attention, which the paper's code imports) given the same weights; padding to any bucket size
leaves every output unchanged; compiles are bounded by the bucket count; ABMIL learns synthetic bags in which a few
tiles carry the label and puts its attention on them."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from gpfm_jax.evaluation import bags, metrics
from gpfm_jax.evaluation.mil_models import MILConfig, build_model
from gpfm_jax.evaluation.mil_train import Targets, TrainConfig, shared_compiles, train_mil

pytestmark = pytest.mark.slow  # the quick tier (-m "not slow") leaves this file out; CI runs it

D = 24


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (LayerNorm scales around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))


def _np(sd: dict, key: str) -> np.ndarray:
    return sd[key].detach().numpy()


def _dense(sd: dict, prefix: str, bias: bool = True) -> dict:
    out = {"kernel": _np(sd, f"{prefix}.weight").T}
    if bias:
        out["bias"] = _np(sd, f"{prefix}.bias")
    return out


def _padded(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    return bags.pad_bags([x], size)


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_abmil_matches_torchmil_gated_abmil():
    from torchmil.models import ABMIL as TorchABMIL

    torch.manual_seed(0)
    ref = TorchABMIL(in_shape=(D,), att_dim=16, gated=True,
                     feat_ext=torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.ReLU()))
    _randomise(ref, 1)
    ref.eval()
    sd = ref.state_dict()
    params = {"proj": {"fc": _dense(sd, "feat_ext.0")}, "attention_a": _dense(sd, "pool.fc1.module"),
              "attention_b": _dense(sd, "pool.fc_gated.module"), "attention_c": _dense(sd, "pool.fc2", False),
              "classifier": _dense(sd, "classifier.module")}
    model = build_model(MILConfig("abmil", num_outputs=1, hidden_dim=32, attention_dim=16, attention_bias=False,
                                  dropout=0.0))
    rng = np.random.default_rng(0)
    worst = 0.0
    for n in (1, 7, 300):
        x = rng.standard_normal((n, D)).astype(np.float32)
        with torch.no_grad():
            want, f = ref(torch.from_numpy(x[None]), return_att=True)
        for size in (n, 512):  # unpadded and padded to a bucket
            xp, mask = _padded(x, size)
            logits, att = model.apply({"params": params}, xp, mask)
            worst = max(worst, float(np.abs(np.asarray(logits)[0, 0] - want.numpy()[0])))
            np.testing.assert_allclose(np.asarray(att)[0, :n], _softmax(f.numpy()[0]), atol=1e-6)
            assert np.all(np.asarray(att)[0, n:] == 0)
    print(f"ABMIL vs torchmil: max |logit diff| {worst:.2e}")
    assert worst <= 1e-5, worst
    # torchmil's own mask handling agrees with ours on a batch of two padded bags.
    xb = rng.standard_normal((2, 40, D)).astype(np.float32)
    mb = np.arange(40)[None, :] < np.array([[25], [40]])
    with torch.no_grad():
        want = ref(torch.from_numpy(xb), torch.from_numpy(mb)).numpy()
    got = np.asarray(model.apply({"params": params}, xb, mb)[0])[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def _transmil_params(sd: dict, layers: int, paper: bool) -> dict:
    conv = lambda w: np.transpose(w, (2, 3, 1, 0))  # torch OIHW (groups=C) -> HWIO
    p = {"fc": _dense(sd, "fc1" if not paper else "fc.0"), "cls_token": _np(sd, "cls_token").reshape(-1),
         "norm": {"scale": _np(sd, "norm.weight"), "bias": _np(sd, "norm.bias")},
         "classifier": _dense(sd, "classifier"),
         "pos_layer": {n: {"kernel": conv(_np(sd, f"pos_layer.{n}.weight")), "bias": _np(sd, f"pos_layer.{n}.bias")}
                       for n in ("proj", "proj1", "proj2")}}
    for i in range(layers):
        if paper:
            p[f"layers_{i}_norm"] = {"scale": _np(sd, f"layers.{i}.norm.weight"), "bias": _np(sd, f"layers.{i}.norm.bias")}
            w = _np(sd, f"layers.{i}.attn.res_conv.weight")  # [h, 1, K, 1]
            p[f"layers_{i}"] = {"to_qkv": {"kernel": _np(sd, f"layers.{i}.attn.to_qkv.weight").T},
                                "to_out": _dense(sd, f"layers.{i}.attn.to_out.0"),
                                "res_conv": np.transpose(w, (2, 3, 1, 0))}
        else:
            p[f"layers_{i}_norm"] = {"scale": _np(sd, f"layers.{i}.norm1.weight"),
                                     "bias": _np(sd, f"layers.{i}.norm1.bias")}
            p[f"layers_{i}"] = {"to_qkv": {"kernel": _np(sd, f"layers.{i}.att_module.qkv_nn.weight").T}}
    return {"bag": p}


@pytest.mark.parametrize("layers", [2, 3])
def test_transmil_matches_torchmil(layers):
    from torchmil.models import TransMIL as TorchTransMIL

    torch.manual_seed(0)
    ref = TorchTransMIL(in_shape=(D,), att_dim=32, n_layers=layers, n_heads=4, n_landmarks=8)
    _randomise(ref, 2)
    ref.eval()
    params = _transmil_params(ref.state_dict(), layers, paper=False)
    model = build_model(MILConfig("transmil", num_outputs=1, hidden_dim=32, heads=4, landmarks=8,
                                  residual_conv_kernel=0, attn_out_proj=False, fc_relu=False, dropout=0.0,
                                  attn_dropout=0.0, num_layers=layers))
    rng = np.random.default_rng(1)
    worst_logit = worst_att = 0.0
    apply = jax.jit(model.apply)
    for n in (2, 37, 200):  # fewer tokens than landmarks, and several tokens per landmark
        x = rng.standard_normal((n, D)).astype(np.float32)
        with torch.no_grad():
            want, att_ref = ref(torch.from_numpy(x[None]), return_att=True)
        for size in (n, 256):
            logits, att = apply({"params": params}, *_padded(x, size))
            worst_logit = max(worst_logit, float(np.abs(np.asarray(logits)[0, 0] - want.numpy()[0])))
            worst_att = max(worst_att, float(np.abs(np.asarray(att)[0, :n] - att_ref.numpy()[0]).max()))
    print(f"TransMIL ({layers} layers) vs torchmil: logits {worst_logit:.2e}, attention {worst_att:.2e}")
    assert worst_logit <= 1e-5 and worst_att <= 1e-5, (worst_logit, worst_att)


class _PaperTransMIL(torch.nn.Module):
    """TransMIL as its paper's code builds it (TransLayer = x + NystromAttention(LayerNorm(x)) with lucidrains'
    nystrom-attention: 8 heads, dim/8 per head, dim/2 landmarks, 6 pinv iterations, residual conv 33; fc with ReLU;
    PPEG after the first layer), from PyPI modules: nystrom_attention.NystromAttention and torchmil's PPEG."""

    def __init__(self, in_dim: int, dim: int, classes: int):
        super().__init__()
        from nystrom_attention import NystromAttention
        from torchmil.models.transmil import PPEG

        self.fc = torch.nn.Sequential(torch.nn.Linear(in_dim, dim), torch.nn.ReLU())
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.layers = torch.nn.ModuleList()
        for _ in range(2):
            layer = torch.nn.Module()
            layer.norm = torch.nn.LayerNorm(dim)
            layer.attn = NystromAttention(dim=dim, dim_head=dim // 8, heads=8, num_landmarks=dim // 2,
                                          pinv_iterations=6, residual=True, dropout=0.1)
            self.layers.append(layer)
        self.pos_layer = PPEG(dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.classifier = torch.nn.Linear(dim, classes)

    def forward(self, x):
        h = self.fc(x)
        n = h.shape[1]
        side = int(np.ceil(np.sqrt(n)))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)
        h = torch.cat([self.cls_token.expand(1, -1, -1), h], dim=1)
        h = h + self.layers[0].attn(self.layers[0].norm(h))
        h = self.pos_layer(h, side, side)
        h = h + self.layers[1].attn(self.layers[1].norm(h))
        return self.classifier(self.norm(h)[:, 0])


def test_transmil_paper_layout_matches_nystrom_attention():
    torch.manual_seed(0)
    ref = _PaperTransMIL(D, 64, 3)
    _randomise(ref, 3)
    ref.eval()
    params = _transmil_params(ref.state_dict(), 2, paper=True)
    model = build_model(MILConfig("transmil", num_outputs=3, hidden_dim=64, dropout=0.0, attn_dropout=0.0))
    rng = np.random.default_rng(2)
    worst = 0.0
    apply = jax.jit(model.apply)
    for n in (3, 150):  # 150 tiles: 170 tokens, 32 landmarks of 6 tokens each
        x = rng.standard_normal((n, D)).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(x[None])).numpy()
        for size in (n, 320):
            logits, _ = apply({"params": params}, *_padded(x, size))
            worst = max(worst, float(np.abs(np.asarray(logits) - want).max()))
    print(f"TransMIL paper layout vs nystrom-attention: max |logit diff| {worst:.2e}")
    assert worst <= 1e-5, worst


def test_mean_pooling_is_padding_invariant_and_exact():
    model = build_model(MILConfig("mean", num_outputs=2, hidden_dim=None))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((11, D)).astype(np.float32)
    w, b = rng.standard_normal((D, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32)
    params = {"classifier": {"kernel": w, "bias": b}}
    for size in (11, 64):
        logits, att = model.apply({"params": params}, *_padded(x, size))
        np.testing.assert_allclose(np.asarray(logits)[0], x.mean(0) @ w + b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(att)[0, :11], 1 / 11, rtol=1e-6)


def test_buckets():
    sizes = bags.bucket_sizes(100_000, 256, 1.5, 64)
    assert sizes[0] == 256 and sizes[-1] >= 100_000 and len(sizes) <= 16
    assert all(s % 64 == 0 for s in sizes) and all(b / a <= 1.5 + 64 / a for a, b in zip(sizes, sizes[1:]))
    assert bags.bucket_for(256, sizes) == 256 and bags.bucket_for(257, sizes) == sizes[1]
    default = bags.bucket_sizes(100_000)  # x1.25: waste <= 1/5 of a bag's compute, 27 buckets up to 100k tiles
    assert len(default) == 27 and all(b / a <= 1.25 + 64 / a for a, b in zip(default, default[1:]))
    with pytest.raises(bags.BagError, match="exceeds"):
        bags.bucket_for(sizes[-1] + 1, sizes)


def test_grouped_folds_keep_patients_together_and_balance_classes():
    rng = np.random.default_rng(4)
    patients = [f"p{i // 2}" for i in range(90)] + [f"q{i}" for i in range(30)]  # 45 patients with 2 slides each
    y = rng.integers(0, 3, 120)
    fold = bags.grouped_folds(y, patients, 5, seed=0)
    for p in set(patients):
        assert len({fold[i] for i, q in enumerate(patients) if q == p}) == 1
    counts = np.bincount(fold)
    assert counts.max() - counts.min() <= 6
    assert np.array_equal(fold, bags.grouped_folds(y, patients, 5, seed=0))


def _synthetic_bags(num: int, dim: int, key_tiles: int, seed: int):
    """Positive bags hide `key_tiles` tiles shifted along one direction among N(0, 1) tiles; negative bags have none."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(100).standard_normal(dim)
    direction /= np.linalg.norm(direction)
    out, labels, keys = [], np.arange(num) % 2, []
    for y in labels:
        n = int(rng.integers(30, 300))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        key = np.zeros(n, bool)
        if y:
            key[rng.choice(n, key_tiles, replace=False)] = True
            x[key] += 4.0 * direction
        out.append(x)
        keys.append(key)
    return out, labels, keys


def test_abmil_learns_few_key_tiles_with_bounded_compiles():
    xs, y, keys = _synthetic_bags(160, 32, key_tiles=5, seed=0)
    store = list(xs)  # any indexable of bags works as the store
    sizes = np.array([len(x) for x in xs])
    buckets = bags.bucket_sizes(int(sizes.max()), 128, 1.5, 64)  # 128, 192, 320
    idx = np.arange(160)
    train, val, test = idx[:100], idx[100:120], idx[120:]
    model_cfg = MILConfig("abmil", hidden_dim=64, attention_dim=32, dropout=0.0)
    cfg = TrainConfig(learning_rate=2e-3, epochs=30, patience=8, bucket_min=128)
    compiles = shared_compiles(model_cfg, cfg)
    before = sum(compiles.values())
    trained = train_mil(store, sizes, Targets(label=y), train, val, model_cfg, cfg, 32, buckets)
    used = {bags.bucket_for(int(n), buckets) for n in sizes}
    assert sum(compiles.values()) - before <= 2 * len(used)  # one train + one predict compile per bucket
    logits, atts = trained.model.predict(store, test, buckets, attention=True)
    proba = _softmax(logits)
    auc = metrics.classification_metrics(y[test], proba)["auc"]
    mass = [a[keys[i]].sum() for i, a in zip(test, atts) if y[i]]  # attention on the 5 key tiles (~2% of tiles)
    print(f"ABMIL synthetic: test AUC {auc:.4f}, median attention on key tiles {np.median(mass):.3f}")
    assert auc >= 0.95, auc
    assert np.median(mass) >= 0.5, np.median(mass)


@pytest.mark.parametrize("rate", [0.25, 0.1])
def test_packed_dropout_masks_have_the_stated_keep_probability(rate):
    from gpfm_jax.evaluation.mil_models import keep_mask

    mask, keep = keep_mask(jax.random.key(0), (1000, 1000), 1.0 - rate)
    assert keep == pytest.approx(1.0 - rate, abs=1 / 65536)
    assert keep == (0.75 if rate == 0.25 else keep)  # 0.25: exactly 192/256
    m = np.asarray(mask)
    sd = np.sqrt(keep * (1 - keep) / m.size)
    assert abs(m.mean() - keep) < 4 * sd
    assert abs(m[:, ::2].mean() - m[:, 1::2].mean()) < 6 * sd  # neighbouring bytes are independent
    other, _ = keep_mask(jax.random.key(1), (1000, 1000), 1.0 - rate)
    assert abs((m & np.asarray(other)).mean() - keep**2) < 4 * sd  # independent keys, independent masks
