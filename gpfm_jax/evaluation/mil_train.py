"""Training one MIL model (one fold): AdamW + cosine decay, early stopping on the validation loss, bags padded to a
few bucket sizes so the jitted train / predict steps compile once per bucket (counted in `compiles`).

Batches: one bag per step by default (CLAM); the Cox loss needs a risk set, so survival with `loss="cox"` uses
`batch_size` bags per step (default 16), grouped by size so little compute goes into padding. The last batch of an
epoch is filled with empty bags of weight 0, so every step of a bucket has one shape. Bags larger than
`max_instances` are randomly subsampled for training (never for prediction).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpfm_jax.evaluation import bags, survival
from gpfm_jax.evaluation.mil_models import MILConfig, build_model

LOSSES = ("ce", "nll_surv", "cox")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    loss: str = "ce"
    learning_rate: float = 2e-4  # CLAM's Adam lr 2e-4, weight decay 1e-5
    weight_decay: float = 1e-5
    epochs: int = 50  # the cosine schedule spans this many epochs
    patience: int = 10  # epochs without a lower validation loss before stopping
    min_epochs: int = 5  # never stop before this many epochs
    batch_size: int = 0  # 0 = auto: 1 bag per step, 16 for the Cox loss
    max_instances: int | None = None  # random subset of tiles per training bag
    bucket_min: int = 256
    bucket_factor: float = 1.25
    surv_alpha: float = 0.0  # NLL-surv weight of the uncensored-only term (MCAT's alpha_surv)
    cox_ties: str = "breslow"
    seed: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")

    @property
    def bags_per_step(self) -> int:
        return self.batch_size or (16 if self.loss == "cox" else 1)


@dataclasses.dataclass
class Targets:
    """Per-slide training targets (numpy): labels for CE, bins/event for NLL-surv, time/event for Cox."""

    label: np.ndarray | None = None
    bins: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class TrainedMIL:
    model: Any
    params: Any
    history: list[dict[str, float]]
    best_epoch: int
    compiles: Counter
    seconds: float


def loss_fn(kind: str, logits: jax.Array, tgt: dict[str, jax.Array], weights: jax.Array, cfg: TrainConfig):
    if kind == "ce":
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt["label"])
        return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
    if kind == "nll_surv":
        return survival.nll_surv_loss(logits, tgt["bins"], tgt["event"], weights, cfg.surv_alpha)
    return survival.cox_loss(logits[:, 0], tgt["time"], tgt["event"].astype(bool), weights > 0, cfg.cox_ties)


@functools.lru_cache(maxsize=8)
def _steps(model_cfg: MILConfig, cfg: TrainConfig) -> "_Steps":
    return _Steps(model_cfg, dataclasses.replace(cfg, seed=0, epochs=0))


def shared_compiles(model_cfg: MILConfig, cfg: TrainConfig) -> Counter:
    """The live compile counter of the steps this setting uses ({"train BxN" | "predict BxN": traces})."""
    return _steps(model_cfg, cfg).compiles


class _Steps:
    """The jitted train / predict steps of one (model, loss, optimizer) setting, shared by every fold and run in the
    process, so a bucket size compiles once. The learning rate is an input (the host computes the cosine schedule),
    so the step does not depend on the number of steps per fold."""

    def __init__(self, model_cfg: MILConfig, cfg: TrainConfig):
        self.cfg = cfg
        self.model = build_model(model_cfg)
        self.tx = optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.learning_rate,
                                                       weight_decay=cfg.weight_decay)
        self.compiles: Counter = Counter()
        self.init = jax.jit(self.model.init)
        self.train = jax.jit(self._train_step, donate_argnums=(0, 1))
        self.predict = jax.jit(self._predict_step)

    def _train_step(self, params, opt_state, x, mask, tgt, weights, key, lr):
        self.compiles[f"train {x.shape[0]}x{x.shape[1]}"] += 1  # runs at trace time only

        def objective(p):
            logits, _ = self.model.apply({"params": p}, x, mask, train=True, rngs={"dropout": key})
            return loss_fn(self.cfg.loss, logits, tgt, weights, self.cfg)

        loss, grads = jax.value_and_grad(objective)(params)
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def _predict_step(self, params, x, mask):
        self.compiles[f"predict {x.shape[0]}x{x.shape[1]}"] += 1
        return self.model.apply({"params": params}, x, mask, train=False)


class MILTrainer:
    """One model's parameters and optimizer state, driven through the shared jitted steps."""

    def __init__(self, model_cfg: MILConfig, cfg: TrainConfig, feature_dim: int, steps_per_epoch: int):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.steps = _steps(model_cfg, cfg)
        self.model = self.steps.model
        self.total = max(cfg.epochs * steps_per_epoch, 1)
        self.step = 0
        key = jax.random.key(cfg.seed)
        x0 = jnp.zeros((1, 16, feature_dim), jnp.float32)
        self.params = self.steps.init({"params": key}, x0, jnp.ones((1, 16), bool))["params"]
        self.opt_state = self.steps.tx.init(self.params)
        self.key = jax.random.fold_in(key, 1)

    @property
    def compiles(self) -> Counter:
        return self.steps.compiles

    def learning_rate(self) -> float:
        """Cosine decay from the peak to 0 over all training steps (optax.cosine_decay_schedule's formula)."""
        frac = min(self.step, self.total) / self.total
        return 0.5 * self.cfg.learning_rate * (1 + math.cos(math.pi * frac))

    def train_batch(self, batch: list[np.ndarray], tgt: dict[str, np.ndarray], weights: np.ndarray,
                    sizes: list[int]) -> jax.Array:
        x, mask = bags.pad_bags(batch, bags.bucket_for(max(len(b) for b in batch), sizes))
        self.key, sub = jax.random.split(self.key)
        lr = np.float32(self.learning_rate())
        self.params, self.opt_state, loss = self.steps.train(self.params, self.opt_state, x, mask, tgt, weights,
                                                             sub, lr)
        self.step += 1
        return loss

    def predict(self, store, idx: np.ndarray, sizes: list[int], params=None,
                attention: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Logits [len(idx), C] (and each bag's attention over its tiles), one bag per call, no subsampling."""
        params = self.params if params is None else params
        logits, atts = [], []
        for i in idx:
            bag = store[int(i)]
            x, mask = bags.pad_bags([bag], bags.bucket_for(len(bag), sizes))
            lg, att = self.steps.predict(params, x, mask)
            logits.append(lg[0])
            if attention:
                atts.append(att[0, : len(bag)])
        out = np.asarray(jnp.stack(logits), np.float64)
        return out, ([np.asarray(a, np.float32) for a in atts] if attention else None)


def eval_loss(kind: str, logits: np.ndarray, tgt: dict[str, np.ndarray], cfg: TrainConfig) -> float:
    """The training loss over a whole set at once (for Cox: one risk set over all validation slides)."""
    w = jnp.ones(len(logits), jnp.float32)
    t = {k: jnp.asarray(v) for k, v in tgt.items()}
    return float(loss_fn(kind, jnp.asarray(logits, jnp.float32), t, w, cfg))


def _batches(idx: np.ndarray, sizes: np.ndarray, per_step: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches; with several bags per step, bags of similar size share a batch (sorted in windows)."""
    order = rng.permutation(idx)
    if per_step == 1:
        return [order[i : i + 1] for i in range(len(order))]
    window = per_step * 8
    out = []
    for s in range(0, len(order), window):
        w = order[s : s + window]
        w = w[np.argsort(sizes[w], kind="stable")]
        out += [w[i : i + per_step] for i in range(0, len(w), per_step)]
    return [out[i] for i in rng.permutation(len(out))]


def train_mil(store, sizes_per_bag: np.ndarray, targets: Targets, train_idx: np.ndarray, val_idx: np.ndarray,
              model_cfg: MILConfig, cfg: TrainConfig, feature_dim: int, buckets: list[int],
              log=None) -> TrainedMIL:
    """Trains on train_idx, keeps the parameters of the epoch with the lowest validation loss."""
    start = time.perf_counter()
    per_step = min(cfg.bags_per_step, len(train_idx))
    steps = math.ceil(len(train_idx) / per_step)
    trainer = MILTrainer(model_cfg, cfg, feature_dim, steps)
    rng = np.random.default_rng(cfg.seed)
    val_tgt = targets.take(val_idx)
    best = (np.inf, -1, trainer.params)
    history = []
    for epoch in range(cfg.epochs):
        losses, weights_seen = [], 0.0
        for batch_idx in _batches(train_idx, sizes_per_bag, per_step, rng):
            batch = [bags.subsample(store[int(i)], cfg.max_instances, rng) for i in batch_idx]
            tgt = targets.take(batch_idx)
            weights = np.zeros(per_step, np.float32)
            weights[: len(batch)] = 1.0
            if len(batch) < per_step:  # fill with empty bags of weight 0: one shape per bucket
                batch += [np.zeros((1, feature_dim), np.float32)] * (per_step - len(batch))
                tgt = {k: np.concatenate([v, np.repeat(v[:1], per_step - len(v))]) for k, v in tgt.items()}
            lens = [len(b) if w > 0 else 0 for b, w in zip(batch, weights)]
            x_batch = [b if n else b[:0] for b, n in zip(batch, lens)]
            losses.append(trainer.train_batch(x_batch, tgt, weights, buckets) * len(batch_idx))
            weights_seen += len(batch_idx)
        train_loss = float(jnp.sum(jnp.stack(losses))) / max(weights_seen, 1)
        val_logits, _ = trainer.predict(store, val_idx, buckets)
        val_loss = eval_loss(cfg.loss, val_logits, val_tgt, cfg)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if log:
            log(f"  epoch {epoch + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        if val_loss < best[0] or not np.isfinite(best[0]):
            best = (val_loss, epoch, jax.tree.map(np.asarray, trainer.params))
        elif epoch - best[1] >= cfg.patience and epoch + 1 >= cfg.min_epochs:
            break
    trainer.params = best[2]
    return TrainedMIL(trainer, best[2], history, best[1], trainer.compiles, time.perf_counter() - start)
