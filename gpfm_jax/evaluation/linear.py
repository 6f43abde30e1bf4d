"""Linear probe: multinomial logistic regression on frozen features, trained with AdamW (optax) under a cosine
learning-rate schedule, with early stopping on a validation split (the best-validation-loss weights are kept).

An epoch is one jitted lax.scan over shuffled minibatches; the last minibatch is padded with zero-weight rows, so
every epoch has one compiled shape, and the jitted epoch is shared by every probe with the same optimiser settings
and data shapes (the encoders of a benchmark, folds of equal size) instead of being compiled per probe.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

NORMALISATIONS = ("standard", "l2", "none")


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4  # AdamW decoupled decay on the weights (not the bias)
    epochs: int = 100  # the cosine schedule spans this many epochs
    batch_size: int = 256
    patience: int = 10  # epochs without a better validation loss before stopping
    warmup_epochs: int = 0
    normalise: str = "standard"  # features: z-score with training statistics, L2, or as they are
    seed: int = 0

    def __post_init__(self):
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {self.normalise!r}")


@dataclasses.dataclass
class LinearProbe:
    """A trained probe: the feature normalisation it was trained with, and the weights."""

    params: dict[str, np.ndarray]  # {"w": [D, C], "b": [C]}
    shift: np.ndarray
    scale: np.ndarray
    l2: bool
    history: list[dict[str, float]]  # per epoch: train_loss, val_loss
    best_epoch: int

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.l2:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return (x - self.shift) / self.scale

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = self.transform(x) @ self.params["w"] + self.params["b"]
        return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=1), np.float64)


def _normaliser(x: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray, bool]:
    d = x.shape[1]
    if how == "standard":
        return x.mean(0), np.maximum(x.std(0), 1e-6), False
    return np.zeros(d, np.float32), np.ones(d, np.float32), how == "l2"


def _loss(params: dict, x: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    logits = x @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.lru_cache(maxsize=64)
def _optimizer(learning_rate: float, weight_decay: float, warmup_steps: int,
               total: int) -> optax.GradientTransformation:
    """One optimizer object per setting, so `_epoch` (static in it) compiles once per setting and data shape and is
    reused by every probe with those (the folds and encoders of a benchmark)."""
    if warmup_steps:
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total)
    else:
        schedule = optax.cosine_decay_schedule(learning_rate, total)
    return optax.adamw(schedule, weight_decay=weight_decay, mask={"w": True, "b": False})


@functools.partial(jax.jit, static_argnums=0)
def _epoch(opt, params, opt_state, order, weights, xt, yt, xv, yv):
    """One epoch: a scan over the minibatches `order` [steps, batch] (padding rows weigh 0); returns the mean
    training loss and the validation loss after the epoch."""

    def step(carry, batch):
        p, s = carry
        idx, w = batch
        loss, grads = jax.value_and_grad(_loss)(p, xt[idx], yt[idx], w)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss * jnp.sum(w)

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (order, weights))
    return params, opt_state, jnp.sum(losses) / xt.shape[0], _loss(params, xv, yv, jnp.ones(len(yv), jnp.float32))


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                       num_classes: int, cfg: LinearProbeConfig = LinearProbeConfig()) -> LinearProbe:
    train_x = np.asarray(train_x, np.float32)
    shift, scale, l2 = _normaliser(train_x, cfg.normalise)
    probe = LinearProbe({}, shift.astype(np.float32), scale.astype(np.float32), l2, [], 0)
    xt, xv = jnp.asarray(probe.transform(train_x)), jnp.asarray(probe.transform(val_x))
    yt, yv = jnp.asarray(train_y, jnp.int32), jnp.asarray(val_y, jnp.int32)
    n, d = xt.shape
    bs = min(cfg.batch_size, n)
    steps = -(-n // bs)
    total = max(cfg.epochs * steps, 1)
    opt = _optimizer(float(cfg.learning_rate), float(cfg.weight_decay), cfg.warmup_epochs * steps, total)
    params = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
    opt_state = opt.init(params)

    rng = np.random.default_rng(cfg.seed)
    best: tuple[float, int, Any] = (np.inf, -1, params)
    pad = steps * bs - n
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]).reshape(steps, bs)
    for e in range(cfg.epochs):
        order = np.concatenate([rng.permutation(n), np.zeros(pad, np.int64)]).reshape(steps, bs)
        params, opt_state, train_loss, val_loss = _epoch(opt, params, opt_state, order, weights, xt, yt, xv, yv)
        probe.history.append({"train_loss": float(train_loss), "val_loss": float(val_loss)})
        if float(val_loss) < best[0]:
            best = (float(val_loss), e, params)
        elif e - best[1] >= cfg.patience:
            break
    probe.params = {k: np.asarray(v) for k, v in best[2].items()}
    probe.best_epoch = best[1]
    return probe
