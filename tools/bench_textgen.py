"""Report-generator throughput: slides/s of the jitted training step and of the jitted beam search, and how many
programs each compiled, on synthetic bags (log-uniform sizes, padded to gpfm-eval's buckets).

    python tools/bench_textgen.py [--slides 32] [--min-tiles 200] [--max-tiles 4000] [--dim 1024] [--width 512]
                                  [--heads 8] [--layers 3] [--memory-slots 2048] [--region-size 96]
                                  [--length 100] [--beam 3] [--batch 1] [--eval-batch 4] [--rounds 2]
                                  [--full-buffer]

The model is gpfm-eval report's HistGen-style generator at the given size (default: the full-size protocol, width
512, 3 decoder layers, memory 2048 x 512, regions of 96 tiles). Warm-up (compiles, timed separately) is excluded;
each round runs one training epoch over the slides and decodes every slide once (beam search with trigram
blocking over the full `--length`, since random weights rarely emit the end token early); the figure is the
median over rounds. Decoding uses the key/value cache; `--full-buffer` also times, in the same run and with the
same parameters, the reference decoder that re-reads the whole buffer at every step, and prints the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=32)
    ap.add_argument("--min-tiles", type=int, default=200)
    ap.add_argument("--max-tiles", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--memory-slots", type=int, default=2048)
    ap.add_argument("--region-size", type=int, default=96)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="slides per training step (HistGen: 1)")
    ap.add_argument("--eval-batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--full-buffer", action="store_true", help="also time decoding without the key/value cache")
    args = ap.parse_args()

    import jax

    from gpfm_jax.evaluation import bags, text_fit
    from gpfm_jax.text.models import TextModelConfig
    from gpfm_jax.text.train import TextTrainer, TrainConfig

    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(np.log(args.min_tiles), np.log(args.max_tiles), args.slides)).astype(int)
    store = [rng.standard_normal((s, args.dim)).astype(np.float32) for s in sizes]
    tokens = np.zeros((args.slides, args.length), np.int32)
    for i in range(args.slides):
        n = int(rng.integers(20, args.length - 1))
        tokens[i, 1 : n + 1] = rng.integers(1, args.vocab, n)
    split = text_fit.TextSplit([str(i) for i in range(args.slides)], np.arange(args.slides),
                               np.zeros((args.slides, 0), np.int32), tokens)
    buckets = bags.bucket_sizes(int(sizes.max()))
    cfg = TextModelConfig(kind="report", vocab_size=args.vocab, width=args.width, heads=args.heads,
                          layers=args.layers, encoder_layers=3, region_size=args.region_size,
                          memory_slots=args.memory_slots, max_length=args.length)
    trainer = TextTrainer(cfg, TrainConfig(batch_size=args.batch, beam=args.beam), args.dim)
    print(f"device {jax.devices()[0].device_kind}; {args.slides} slides of {sizes.min()}-{sizes.max()} tiles "
          f"(dim {args.dim}), {len({bags.bucket_for(s, buckets) for s in sizes})} buckets; width {args.width}, "
          f"{args.layers} decoder layers, memory {args.memory_slots}, length {args.length}, beam {args.beam}")

    def epoch(r):
        t = time.perf_counter()
        jax.block_until_ready(text_fit.train_epoch(trainer, store, split, buckets, args.batch, 0, r))
        return time.perf_counter() - t

    last = {}  # trainer -> its latest decoded sequences

    def decode(tr=trainer):
        t = time.perf_counter()
        last[tr] = text_fit.generate(tr, store, split, buckets, args.eval_batch, 0, args.length)
        return time.perf_counter() - t

    warm_train, warm_decode = epoch(np.random.default_rng(1)), decode()
    print(f"warm-up (compiles included): train epoch {warm_train:.1f} s, decode {warm_decode:.1f} s; "
          f"programs compiled: {dict(trainer.compiles)}")
    train_t = [epoch(np.random.default_rng(2 + i)) for i in range(args.rounds)]
    decode_t = [decode() for _ in range(args.rounds)]
    print(f"training: {args.slides / statistics.median(train_t):.2f} slides/s "
          f"(median of {args.rounds} epochs: {statistics.median(train_t):.2f} s)")
    print(f"decoding (beam {args.beam}, {args.length} steps): {args.slides / statistics.median(decode_t):.2f} "
          f"slides/s (median {statistics.median(decode_t):.2f} s)")
    print(f"programs compiled in all: {sum(trainer.compiles.values())} {dict(trainer.compiles)}")
    if args.full_buffer:
        ref = TextTrainer(cfg, TrainConfig(batch_size=args.batch, beam=args.beam, kv_cache=False), args.dim)
        ref.params = trainer.params
        warm = decode(ref)
        ref_t = [decode(ref) for _ in range(args.rounds)]
        same = bool((last[trainer] == last[ref]).all())
        print(f"full-buffer decoding (no cache; warm-up {warm:.1f} s, {sum(ref.compiles.values())} programs): "
              f"{args.slides / statistics.median(ref_t):.3f} slides/s (median {statistics.median(ref_t):.2f} s); "
              f"key/value cache {statistics.median(ref_t) / statistics.median(decode_t):.1f}x faster; "
              f"same sequences: {same}")


if __name__ == "__main__":
    main()
