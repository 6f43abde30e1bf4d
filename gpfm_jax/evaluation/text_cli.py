"""The `report` and `vqa` subcommands of gpfm-eval (parsers and runners; cli.py only registers them).

    gpfm-eval report --features DIR --annotations ANN.json --out results.json [--epochs 40] [--beam 3] ...
    gpfm-eval vqa --format wsivqa --features DIR --train T.json --val V.json --test X.json --out results.json
    gpfm-eval vqa --format pathvqa --features TILES.h5 ... --answer-list A.json --out results.json
"""

from __future__ import annotations

import argparse
from typing import Any


def _model_args(p: argparse.ArgumentParser, layers: int, memory: int, regions: int) -> None:
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=layers, help="decoder layers")
    p.add_argument("--encoder-layers", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.1)
    if memory:
        p.add_argument("--memory-slots", type=int, default=memory, help="cross-modal memory size (0: off)")
        p.add_argument("--region-size", type=int, default=regions, help="tiles per region (0: no aggregator)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-decay", type=float, default=0.8, help="learning rate factor per epoch")
    p.add_argument("--weight-decay", type=float, default=5e-5)
    p.add_argument("--clip-value", type=float, default=0.1, help="elementwise gradient clip")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--beam", type=int, default=3, help="beam width (1: greedy)")
    p.add_argument("--no-trigram-blocking", action="store_true")
    p.add_argument("--length-penalty", type=float, default=0.0, help="score / length ** alpha (0: none)")
    p.add_argument("--min-count", type=int, default=None, help="vocabulary: words seen at least this often")
    p.add_argument("--eval-batch", type=int, default=8, help="samples per decoding call")
    p.add_argument("--bucket-factor", type=float, default=1.25)
    p.add_argument("--smallest-bucket", type=int, default=256, help="smallest padded bag size")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "--json", dest="json", default=None, help="results JSON (written atomically)")


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="slide report generation (HistGen protocol) on slide feature files")
    p.add_argument("--features", required=True, help="folder of per-slide .h5 files from gpfm-extract")
    p.add_argument("--annotations", required=True, help="HistGen annotation JSON (train / val / test reports)")
    p.add_argument("--max-length", type=int, default=100, help="report length in ids (HistGen: 100)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java)")
    _model_args(p, 3, 2048, 96)
    v = sub.add_parser("vqa", help="visual question answering: WSI-VQA (slides, W2T) or PathVQA (tiles, MUMC)")
    v.add_argument("--format", required=True, choices=("wsivqa", "pathvqa"))
    v.add_argument("--features", required=True, nargs="+",
                   help="wsivqa: folder of slide .h5 files; pathvqa: tile-feature .h5 file(s)")
    v.add_argument("--train", required=True, help="training questions (WsiVQA_train.json / pathvqa_train.json)")
    v.add_argument("--val", required=True, help="validation questions (epoch selection)")
    v.add_argument("--test", required=True, help="test questions")
    v.add_argument("--answer-list", default=None, help="pathvqa: candidate answers JSON (ranked by likelihood)")
    v.add_argument("--max-length", type=int, default=60, help="answer length in ids (W2T: 60)")
    v.add_argument("--max-question", type=int, default=30,
                   help="question length in ids (wsivqa: words; pathvqa: WordPiece pieces of MUMC's 30 words)")
    v.add_argument("--vocab-size", type=int, default=30522, help="pathvqa: WordPiece size at most (BERT's)")
    v.add_argument("--tokenizer", default=None,
                   help="pathvqa: a saved WordPiece (a run's X.tokenizer.json) used instead of training one")
    _model_args(v, 3, 0, 0)


def _configs(args):
    from gpfm_jax.text.models import TextModelConfig
    from gpfm_jax.text.train import TrainConfig

    model = TextModelConfig(width=args.width, heads=args.heads, layers=args.layers,
                            encoder_layers=args.encoder_layers, dropout=args.dropout,
                            memory_slots=getattr(args, "memory_slots", 0), region_size=getattr(args, "region_size", 0))
    train = TrainConfig(learning_rate=args.lr, lr_decay=args.lr_decay, weight_decay=args.weight_decay,
                        clip_value=args.clip_value, epochs=args.epochs, batch_size=args.batch_size, beam=args.beam,
                        block_trigrams=not args.no_trigram_blocking, length_penalty=args.length_penalty,
                        seed=args.seed)
    return model, train


def _print(result: dict[str, Any]) -> None:
    ci = result.get("ci", {})
    for k, v in result["metrics"].items():
        lo_hi = f"  [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" if k in ci else ""
        print(f"{k:>24}: {v:.4f}{lo_hi}")
    if "meteor_skipped" in result:
        print(result["meteor_skipped"])
    print(f"selected epoch {result['selected_epoch']} ({result['selection']})")


def run(args) -> dict[str, Any]:
    model, train = _configs(args)
    if args.command == "report":
        from gpfm_jax.evaluation.report_task import ReportRun, run_report

        cfg = ReportRun(args.features, args.annotations, model, train, min_count=args.min_count or 10,
                        max_length=args.max_length, bootstrap=args.bootstrap, eval_batch=args.eval_batch,
                        bucket_factor=args.bucket_factor, smallest_bucket=args.smallest_bucket,
                        with_meteor=not args.no_meteor)
        result = run_report(cfg, args.json)
    else:
        from gpfm_jax.evaluation.vqa_task import VQARun, run_vqa

        cfg = VQARun(args.format, args.features, args.train, args.val, args.test, args.answer_list, model, train,
                     min_count=args.min_count or 1, max_length=args.max_length, max_question=args.max_question,
                     bootstrap=args.bootstrap, eval_batch=args.eval_batch, bucket_factor=args.bucket_factor,
                     smallest_bucket=args.smallest_bucket, vocab_size=args.vocab_size, tokenizer=args.tokenizer)
        result = run_vqa(cfg, args.json)
    _print(result)
    return result
