"""ABMIL training throughput (bags/s): gpfm_jax's jitted, bucket-padded step vs torchmil's ABMIL in eager PyTorch,
on the same synthetic bags (same sizes, feature width, widths of the layers), interleaved epoch by epoch in one run.

    python tools/bench_mil.py [--bags 48] [--min-tiles 200] [--max-tiles 8000] [--dim 1024] [--rounds 3]
                              [--threads N] [--jax-single-thread]

Both sides train CLAM_SB's gated-attention ABMIL (fc dim->512 + ReLU + dropout 0.25, attention 512->256 gated,
classifier; no dropout in the attention branches, which torchmil's AttentionPool lacks), one bag per step, AdamW (lr 2e-4, wd 1e-5) with a cosine schedule; torchmil's ABMIL has one output
with BCE, ours two with cross-entropy (a 512x1 vs 512x2 head: no measurable difference). JAX pads each bag to its
bucket (sizes x1.25), torch runs each bag at its own size. Warm-up epochs (JAX: compiles, counted and timed) are
excluded; then the two alternate, and the ratio is the median over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def make_bags(n: int, lo: int, hi: int, dim: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int)  # log-uniform, as slide sizes spread
    return [rng.standard_normal((s, dim)).astype(np.float32) for s in sizes], (np.arange(n) % 2)


class JaxSide:
    def __init__(self, dim: int, steps: int, bucket_factor: float):
        from gpfm_jax.evaluation.mil_models import MILConfig
        from gpfm_jax.evaluation.mil_train import MILTrainer, TrainConfig

        model = MILConfig("abmil", num_outputs=2, attention_dropout=0.0)  # torchmil: dropout only after fc
        self.trainer = MILTrainer(model, TrainConfig(bucket_factor=bucket_factor), dim, steps)
        self.bucket_factor = bucket_factor

    def epoch(self, bags, labels, order, buckets) -> float:
        import jax

        start = time.perf_counter()
        loss = None
        for i in order:
            loss = self.trainer.train_batch([bags[i]], {"label": labels[i : i + 1]}, np.ones(1, np.float32), buckets)
        jax.block_until_ready(loss)
        return time.perf_counter() - start


class TorchSide:
    def __init__(self, dim: int, steps: int):
        import torch
        from torchmil.models import ABMIL

        torch.manual_seed(0)
        self.torch = torch
        fc = torch.nn.Sequential(torch.nn.Linear(dim, 512), torch.nn.ReLU(), torch.nn.Dropout(0.25))
        self.model = ABMIL(in_shape=(dim,), att_dim=256, gated=True, feat_ext=fc)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-4, weight_decay=1e-5)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, steps)

    def epoch(self, bags, labels, order) -> float:
        torch = self.torch
        start = time.perf_counter()
        for i in order:
            x = torch.from_numpy(bags[i])[None]
            y = torch.tensor([float(labels[i])])
            _, losses = self.model.compute_loss(y, x)
            loss = sum(losses.values())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=48)
    ap.add_argument("--min-tiles", type=int, default=200)
    ap.add_argument("--max-tiles", type=int, default=8000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bucket-factor", type=float, default=1.25)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    ap.add_argument("--jax-single-thread", action="store_true",
                    help="XLA on one thread too (compare with --threads 1)")
    args = ap.parse_args(argv)
    if args.jax_single_thread:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()

    import jax
    import torch

    from gpfm_jax.evaluation import bags as bagmod

    torch.set_num_threads(args.threads)
    bags, labels = make_bags(args.bags, args.min_tiles, args.max_tiles, args.dim, 0)
    sizes = [len(b) for b in bags]
    buckets = bagmod.bucket_sizes(max(sizes), factor=args.bucket_factor)
    padded = sum(bagmod.bucket_for(s, buckets) for s in sizes)
    print(f"{args.bags} bags, {min(sizes)}-{max(sizes)} tiles (total {sum(sizes)}), dim {args.dim}; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({args.threads} threads); "
          f"bucket padding adds {100 * (padded / sum(sizes) - 1):.1f}% tiles")
    steps = args.bags * (args.rounds + 1)
    jx, th = JaxSide(args.dim, steps, args.bucket_factor), TorchSide(args.dim, steps)
    rng = np.random.default_rng(1)

    order = rng.permutation(args.bags)
    t_warm = jx.epoch(bags, labels, order, buckets)
    compiles = sum(jx.trainer.compiles.values())
    print(f"jax warm-up epoch {t_warm:.1f} s including {compiles} compiles "
          f"({len({bagmod.bucket_for(s, buckets) for s in sizes})} buckets used)")
    th.epoch(bags, labels, order)
    ratios, jrates, trates = [], [], []
    for r in range(args.rounds):
        order = rng.permutation(args.bags)
        if r % 2 == 0:
            tj = jx.epoch(bags, labels, order, buckets)
            tt = th.epoch(bags, labels, order)
        else:
            tt = th.epoch(bags, labels, order)
            tj = jx.epoch(bags, labels, order, buckets)
        jrates.append(args.bags / tj)
        trates.append(args.bags / tt)
        ratios.append(tt / tj)
        print(f"round {r + 1}: gpfm_jax {args.bags / tj:.2f} bags/s, torchmil {args.bags / tt:.2f} bags/s, "
              f"ratio {tt / tj:.2f}x")
    extra = sum(jx.trainer.compiles.values()) - compiles
    print(f"median: gpfm_jax {statistics.median(jrates):.2f} bags/s, torchmil {statistics.median(trates):.2f} bags/s,"
          f" speed-up {statistics.median(ratios):.2f}x; compiles after warm-up: {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
