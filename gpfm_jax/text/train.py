"""Training and decoding of the text models: one jitted train step and one jitted decoder per (bucket, batch)
shape, shared by every epoch (`compiles` counts traces, as gpfm-eval mil does).

Optimisation as HistGen: Adam with AMSGrad, L2 weight decay 5e-5 added to the gradient (torch Adam's
`weight_decay`), gradients clipped elementwise to +-0.1 (`clip_grad_value_`), learning rate 1e-4 x 0.8 per epoch
(the host passes the epoch's rate in, so the step never recompiles), teacher-forced cross-entropy averaged over
the target tokens (up to and including the end token).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpfm_jax.text import decode
from gpfm_jax.text.models import TextModel, TextModelConfig, init_params


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-4
    lr_decay: float = 0.8  # per epoch
    weight_decay: float = 5e-5
    clip_value: float = 0.1
    epochs: int = 40
    batch_size: int = 1
    beam: int = 3
    block_trigrams: bool = True
    length_penalty: float = 0.0
    seed: int = 0
    kv_cache: bool = True  # incremental decoding; False re-reads the whole buffer per step (the reference path)


def target_mask(tokens) -> jax.Array:
    """bool [B, T-1]: targets tokens[:, 1:] up to and including the first 0."""
    tgt = tokens[:, 1:]
    return (jnp.cumsum(tgt == 0, axis=1) - (tgt == 0)) == 0


def loss_fn(logits, tokens) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    m = target_mask(tokens)
    return jnp.sum(jnp.where(m, nll, 0.0)) / jnp.maximum(m.sum(), 1)


def model_stepper(model: TextModel, params, memory, memory_mask, prefix, length: int) -> decode.Stepper:
    """The model's incremental decoder as a `decode.Stepper`: key/value cache and the memory's cross-attention
    keys / values made once (`decode_start`), then one token per step (`decode_step`) at position prefix + t."""
    v = {"params": params}
    const, cache = model.apply(v, memory, memory_mask, prefix, length, method="decode_start")
    p = prefix.shape[1]

    def step(cache, seq, t):
        tok = jax.lax.dynamic_slice_in_dim(seq, t, 1, axis=1)
        logits, cache = model.apply(v, const, cache, tok, p + t, method="decode_step")
        return logits[:, 0], cache

    return decode.Stepper(cache, step)


class _Programs:
    """The jitted steps of one (model, optimizer) setting, shared by every trainer with those settings in the
    process (a real task and its shuffled control, successive bench cells), so a shape compiles once."""

    def __init__(self, model_cfg: TextModelConfig, cfg: TrainConfig):
        self.model = TextModel(model_cfg)
        self.cfg = cfg
        self.tx = optax.inject_hyperparams(
            lambda learning_rate: optax.chain(optax.clip(cfg.clip_value), optax.add_decayed_weights(cfg.weight_decay),
                                              optax.amsgrad(learning_rate)))(learning_rate=cfg.learning_rate)
        self.compiles: collections.Counter = collections.Counter()
        self.train = jax.jit(self._train_step, donate_argnums=(0, 1))
        self.generate = jax.jit(self._generate_step, static_argnames=("length", "beam"))
        self.rank = jax.jit(self._rank_step)

    def _train_step(self, params, opt_state, x, mask, prefix, tokens, question, key, lr):
        self.compiles[f"train {x.shape[0]}x{x.shape[1]}"] += 1  # trace time only

        def objective(p):
            logits = self.model.apply({"params": p}, x, mask, prefix, tokens, question, train=True,
                                      rngs={"dropout": key})
            return loss_fn(logits, tokens)

        loss, grads = jax.value_and_grad(objective)(params)
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def _memory(self, params, x, mask, question, repeat: int):
        mem, mem_mask = self.model.apply({"params": params}, x, mask, question, method="encode")
        return jnp.repeat(mem, repeat, axis=0), jnp.repeat(mem_mask, repeat, axis=0)

    def _generate_step(self, params, x, mask, prefix, question, start, length: int, beam: int):
        self.compiles[f"decode {x.shape[0]}x{x.shape[1]}"] += 1
        mem, mem_mask = self._memory(params, x, mask, question, beam)
        pre = jnp.repeat(prefix, beam, axis=0)
        if self.cfg.kv_cache:
            fn = model_stepper(self.model, params, mem, mem_mask, pre, length)
        else:
            fn = functools.partial(self.model.apply, {"params": params}, mem, mem_mask, pre, method="decode")
        if beam == 1:
            return decode.greedy(fn, start, x.shape[0], length)
        return decode.beam_search(fn, start, x.shape[0], length, beam, self.cfg.block_trigrams,
                                  self.cfg.length_penalty)[0]

    def _rank_step(self, params, x, mask, prefix, question, answers):
        self.compiles[f"rank {x.shape[0]}x{x.shape[1]}"] += 1
        a = answers.shape[0]
        mem, mem_mask = self._memory(params, x, mask, question, a)
        pre = jnp.repeat(prefix, a, axis=0)
        fn = functools.partial(self.model.apply, {"params": params}, mem, mem_mask, pre, method="decode")
        return decode.rank_answers(fn, answers, x.shape[0])


@functools.lru_cache(maxsize=16)
def programs(model_cfg: TextModelConfig, cfg: TrainConfig) -> _Programs:
    return _Programs(model_cfg, cfg)


class TextTrainer:
    """Parameters + optimizer state of one model, driven through the shared jitted programs."""

    def __init__(self, model_cfg: TextModelConfig, cfg: TrainConfig, feature_dim: int):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.programs = programs(model_cfg, cfg)
        self.model = self.programs.model
        key = jax.random.key(cfg.seed)
        self.params = init_params(model_cfg, feature_dim, key)
        self.opt_state = self.programs.tx.init(self.params)
        self.key = jax.random.fold_in(key, 1)

    @property
    def compiles(self) -> collections.Counter:
        return self.programs.compiles

    def learning_rate(self, epoch: int) -> float:
        return self.cfg.learning_rate * self.cfg.lr_decay**epoch

    def train_batch(self, x, mask, prefix, tokens, question, epoch: int):
        self.key, sub = jax.random.split(self.key)
        self.params, self.opt_state, loss = self.programs.train(
            self.params, self.opt_state, x, mask, prefix, tokens, question, sub, np.float32(self.learning_rate(epoch)))
        return loss

    def generate(self, x, mask, prefix, question, start: int, length: int, params=None) -> np.ndarray:
        """int [B, length]: decoded sequences (position 0 = start)."""
        params = self.params if params is None else params
        return np.asarray(self.programs.generate(params, x, mask, prefix, question, start, length=length,
                                                 beam=self.cfg.beam))

    def rank(self, x, mask, prefix, question, answers, params=None) -> tuple[np.ndarray, np.ndarray]:
        params = self.params if params is None else params
        best, ll = self.programs.rank(params, x, mask, prefix, question, answers)
        return np.asarray(best), np.asarray(ll)
