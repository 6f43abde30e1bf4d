"""Train the official DINOv2 code (the oracle, tests/dinov2_oracle.py) and gpfm_jax side by side on identical
batches and masks, from identical weights, and plot every loss term of both per iteration.

    python tools/fidelity_dynamics.py --setting tiny --out docs/fidelity_tiny    # the parity test's setting
    python tools/fidelity_dynamics.py --setting demo --out docs/fidelity_demo    # configs/demo.py's setting

--setting tiny: a 2-block dim-64 ViT on 112 px crops of the real H&E tiles in tests/data, GPFM's settings scaled
  (the test suite runs the same for 60 iterations from a randomised start).
--setting demo [--override schedule.teacher_temp=0.07 ...]: the demo run's model, heads, schedules, batch, crops and tiles (cut from the bundled sample slide),
  at the weights both systems start from in `gpfm-train --workdir runs/demo` (the oracle's init).
Both add GPFM's distillation terms (stand-in experts) on top of the oracle exactly as docs/objective.md writes them.
Writes OUT.json (per-iteration terms of both, the worst relative difference per term) and OUT.png.
Needs the test extra (torch, dinov2==0.0.1.dev2 installed with --no-deps, omegaconf, fvcore) and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402

import dinov2_oracle as O  # noqa: E402
import fidelity_bridge as FB  # noqa: E402


def demo_setting(mods, iterations: int, overrides: list[str]):
    """The oracle configured as configs/demo.py (epochs of 5 iterations carry the demo's step counts)."""
    import ast

    from configs.demo import get_config

    c = get_config()
    for item in overrides:  # e.g. schedule.teacher_temp=0.07
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[leaf] = ast.literal_eval(value)
    v, h, s = c.model.vit, c.model.heads, c.schedule
    epoch = 5
    cfg = O.gpfm_cfg(
        mods, batch_per_gpu=c.data.global_batch_size, img=c.data.multicrop.global_size,
        local=c.data.multicrop.local_size, n_local=c.data.multicrop.num_local_crops, patch=v.patch_size,
        out_dim=h.out_dim, hidden=h.hidden_dim, bottleneck=h.bottleneck_dim, epoch_len=epoch,
        epochs=s.total_steps // epoch, warmup_epochs=s.warmup_steps // epoch,
        freeze_epochs=s.freeze_last_layer_steps // epoch, temp_warmup_epochs=s.teacher_temp_warmup_steps // epoch,
        drop_path=0.0, layerscale=v.layerscale_init, base_lr=s.base_lr,
        embed_dim=v.embed_dim, depth=v.depth, num_heads=v.num_heads)
    cfg.teacher.momentum_teacher = s.momentum_teacher
    cfg.teacher.teacher_temp = s.teacher_temp
    cfg.teacher.warmup_teacher_temp = s.teacher_temp_start
    batches = slide_crop_batches(c, iterations, cfg)
    return cfg, batches, dict(embed_dim=c.standin.embed_dim, depth=c.standin.depth, num_heads=c.standin.num_heads,
                              pooler_dim=c.standin.pooler_dim), h.distill_bottleneck_dim


def slide_crop_batches(c, n: int, cfg, seed: int = 0):
    """Multi-crop batches of the demo's tiles (c.data: slides, tile size, magnification), the oracle's layout."""
    from gpfm_jax.data.augment import MultiCropConfig, multi_crop
    from gpfm_jax.data.batch import GLOBAL_CROPS, LOCAL_CROPS
    from gpfm_jax.data.sources import SlideTileSource

    paths = [p for p in str(c.data.path).split(",") if p]
    source = SlideTileSource(paths, c.data.tile_size, c.data.magnification, min_tissue=c.data.min_tissue)
    mc = MultiCropConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(c.data.multicrop).items()})
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        views = [multi_crop(source[int(rng.integers(len(source)))]["image"], rng, mc)
                 for _ in range(cfg.train.batch_size_per_gpu)]
        out.append({"global": np.stack([x[GLOBAL_CROPS] for x in views]).transpose(0, 1, 4, 2, 3),
                    "local": np.stack([x[LOCAL_CROPS] for x in views]).transpose(0, 1, 4, 2, 3)})
    return out


def run(setting: str, iterations: int, overrides: list[str]):
    mods = O.oracle()
    if setting == "tiny":
        cfg = O.gpfm_cfg(mods, epochs=math.ceil(iterations / 10))
        batches = FB.real_crop_batches(iterations, cfg.train.batch_size_per_gpu, cfg, seed=4)
        standin, distill_dim = dict(embed_dim=32, depth=1, num_heads=2, pooler_dim=16), 32
    else:
        cfg, batches, standin, distill_dim = demo_setting(mods, iterations, overrides)
    trainer = O.OracleTrainer(mods, cfg, seed=0)
    experts, expert_params = FB.standin_experts(**standin)
    heads = FB.torch_distill_heads(mods, trainer.model.student.backbone.embed_dim, experts, bottleneck=distill_dim)
    trainer.add_param_groups(heads)
    targets_ref: dict = {}
    trainer.extra_loss = FB.torch_distill_loss(heads, targets_ref)
    twin = FB.jax_twin(trainer, experts=experts, distill_heads=heads)
    t0 = time.time()
    ref, ours = FB.run_dynamics(mods, trainer, twin, batches, experts, expert_params, targets_ref)
    return dict(setting=setting, overrides=overrides, iterations=len(ref), seconds=round(time.time() - t0, 1),
                ln_k=math.log(cfg.dino.head_n_prototypes), oracle=ref, gpfm_jax=ours,
                worst_relative={k: max(abs(o[k] - r[k]) / abs(r[k]) for r, o in zip(ref, ours)) for k in ref[0]})


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["oracle"][0])
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    its = np.arange(result["iterations"])
    for ax, name in zip(axes.flat, names):
        ax.plot(its, [r[name] for r in result["oracle"]], lw=3, color="#bbbbbb", label="DINOv2 (oracle)")
        ax.plot(its, [o[name] for o in result["gpfm_jax"]], lw=1, color="#c0392b", label="gpfm_jax")
        if name == "dino":
            ax.axhline(result["ln_k"], ls=":", color="k", lw=0.8, label="ln K")
        ax.set_title(f"{name}  (worst rel. diff {result['worst_relative'][name]:.1e})", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    extra = f" ({', '.join(result['overrides'])})" if result["overrides"] else ""
    fig.suptitle(f"Loss terms, official DINOv2 code vs gpfm_jax — setting '{result['setting']}'{extra}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=("tiny", "demo"), default="tiny")
    p.add_argument("--iterations", type=int, default=0, help="default: 60 (tiny), 600 (demo)")
    p.add_argument("--out", required=True, help="path prefix: OUT.json and OUT.png")
    p.add_argument("--override", action="append", default=[], help="demo config field=value (python literal)")
    args = p.parse_args(argv)
    iterations = args.iterations or (60 if args.setting == "tiny" else 600)
    result = run(args.setting, iterations, args.override)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("oracle", "gpfm_jax")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
