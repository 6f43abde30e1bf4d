#!/usr/bin/env python
"""gpfm_jax's training step side by side with the official PyTorch DINOv2/GPFM step, on the same device (issue 27).

    python tools/bench_vs_official.py                                   # CPU: a tiny config, both in fp32
    python tools/bench_vs_official.py --size vitl --batches 64,48,32 --json OUT/vs_official.json   # one GPU

The official step is the fidelity oracle's (tests/dinov2_oracle.py, tests/fidelity_bridge.py, imported): dinov2
0.0.1.dev2's SSLMetaArch, losses, optimiser, schedulers and loop body, GPFM's distillation heads and losses on top,
xFormers replaced by a stand-in (torch's `scaled_dot_product_attention` on a GPU). gpfm_jax's production step gets
the same weights (the project's converters), collated batch, masks and random expert teachers (gpfm_jax's, whose
targets feed the official distillation loss as in the oracle test: both sides pay for the same teacher forwards).

1. Equality first: one fp32 step of each (TF32 off, JAX matmuls "highest") on --check-batch images, stochastic depth
   off: every loss term and the weighted total within 1e-5 relative (tests/test_fidelity_step.py's bound). Else one
   line names the loss that differs, exit code 2, nothing timed.
2. Each in its best documented precision: the official code under torch.autocast (GPFM: float16 + GradScaler),
   gpfm_jax in bf16 compute with fp32 params (cuDNN attention, scanned blocks, the config's remat, concatenated
   crops); the recipe's stochastic depth 0.4 on both. Off a GPU both in fp32. GPU batch: the first of --batches both
   fit. 3. --warmup steps each, then --rounds rounds of --iters steps of each, interleaved: img/s (median round),
   peak memory (torch.cuda.max_memory_allocated; JAX's peak_bytes_in_use, a process high-water mark; on the CPU the
   process's max RSS, shared), MFU where the bf16 peak is known (the same model FLOPs for both), the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "tests", REPO):  # the test oracle modules (tools may import tests/; the package never does)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gpfm_jax.data.batch import GLOBAL_CROPS  # noqa: E402

import dinov2_oracle as O  # noqa: E402
import fidelity_bridge as FB  # noqa: E402
from tools import official_step as S  # noqa: E402

LOSS_RTOL = 1e-5  # tests/test_fidelity_step.py: one step's loss terms within 1e-5 relative
SIZES = {  # student, heads, crops; vitl: GPFM's recipe (configs/gpfm_vitl14.py)
    "tiny": dict(arch=dict(embed_dim=64, depth=2, num_heads=4), img=112, local=56, n_local=2, out_dim=256,
                 hidden=64, bottleneck=32, distill_bottleneck=32, drop_path=0.0, batches="4", check_batch=4),
    "vitl": dict(arch=dict(embed_dim=1024, depth=24, num_heads=16), img=224, local=98, n_local=8, out_dim=65536,
                 hidden=2048, bottleneck=256, distill_bottleneck=256, drop_path=0.4, batches="64,48,32,16",
                 check_batch=4),
}
PERTURBATIONS = ("weight", "koleo-weight")
_CHECK_PROGRAMS: dict[tuple, tuple] = {}  # the fp32 check step, compiled: key -> (step, compiled, traced, s, targets)


class Refused(Exception):
    """The two steps are not equal: no timing, no ratio."""


def _test_helpers() -> None:
    """tests/conftest.py (the oracle's tiles and weight randomiser live there) sets JAX_PLATFORMS=cpu and XLA_FLAGS
    for the suite: import it once jax has its backend, and restore the environment for any later subprocess."""
    jax.devices()
    saved = dict(os.environ)
    import conftest  # noqa: F401

    os.environ.clear()
    os.environ.update(saved)


def compare(ours: dict, ref_terms: dict, cfg) -> tuple[str, float]:
    """(worst loss name, its relative difference); raises Refused naming the first loss beyond LOSS_RTOL. The total
    is each side's own weighting of its terms (the oracle's weights from its config, GPFM's distillation weights)."""
    weights = {"dino": cfg.dino.loss_weight, "ibot": cfg.ibot.loss_weight, "koleo": cfg.dino.koleo_loss_weight}
    for k in ref_terms:
        if k.startswith("distill/"):
            _, name, part = k.split("/")
            weights[k] = (FB.DISTILL_CLS if part == "cls" else FB.DISTILL_PATCH)[name]
    ref = {**ref_terms, "total": sum(weights[k] * v for k, v in ref_terms.items())}
    mine = {k[len("loss/"):]: float(v) for k, v in ours.items() if k.startswith("loss/")}
    if set(mine) != set(ref):
        raise Refused(f"refused: the steps compute different losses: gpfm_jax {sorted(mine)} vs official "
                      f"{sorted(ref)}; no timing, no ratio")
    worst = ("", 0.0)
    for k, r in ref.items():
        rel = abs(mine[k] - r) / max(abs(r), 1e-30)
        if not rel <= LOSS_RTOL:
            raise Refused(f"refused: loss '{k}' differs: gpfm_jax {mine[k]:.8g} vs official {r:.8g} (relative "
                          f"{rel:.2e} > {LOSS_RTOL:g}); no timing, no ratio")
        worst = max(worst, (k, rel), key=lambda x: x[1])
    return worst


def check_equal(args, mods, ctx: dict, perturb: str | None) -> dict:
    """One step of each in fp32 on --check-batch images, stochastic depth off, from the same weights."""
    import torch

    trainer, twin, on_gpu = ctx["trainer"], ctx["twin"], ctx["on_gpu"]
    if perturb == "weight":  # the official student moved off the weights gpfm_jax was given
        with torch.no_grad():
            trainer.model.student.backbone.blocks[0].mlp.fc1.weight.mul_(1.1)
    if perturb == "koleo-weight":  # the official objective weighs KoLeo twice as much as gpfm_jax's
        trainer.cfg.dino.koleo_loss_weight *= 2
    data, batch = S.batch_for(mods, trainer, args.check_batch, ctx["device"])
    tx, state = S.jax_state(twin, trainer, ctx["s"])
    remat, max_masked = ctx["remat"] if not on_gpu else "none", int(data["upperbound"])
    key = (args.size, args.check_batch, ctx["batches"][0], on_gpu, remat, max_masked)  # what the program holds
    if key not in _CHECK_PROGRAMS:  # one compile per process (the tests run the check several times)
        step = S.jax_step(twin, tx, state, ctx["experts32"], ctx["params32"], dtype="float32", drop_path=0.0,
                          remat=remat, max_masked=max_masked)
        with jax.default_matmul_precision("highest") if on_gpu else contextlib.nullcontext():
            _CHECK_PROGRAMS[key] = (step, *compile_step(step, state, batch, ctx["params32"]),
                                    S.targets_fn(ctx["experts32"], ctx["grid"]))
    step, compiled, traced, compile_s, tfn = _CHECK_PROGRAMS[key]
    ctx["targets_ref"]["current"] = jax.tree_util.tree_map(np.array, tfn(ctx["params32"], batch[GLOBAL_CROPS]))
    blocks = trainer.model.student.backbone.blocks
    ratios = [blk.sample_drop_ratio for blk in blocks]
    for blk in blocks:
        blk.sample_drop_ratio = 0.0
    try:
        ref_terms = FB.unweighted(FB.oracle_terms(trainer.forward_backward(data, 0)))
    finally:
        for blk, r in zip(blocks, ratios):
            blk.sample_drop_ratio = r
    trainer.optimizer.zero_grad(set_to_none=True)
    state, metrics = compiled(state, batch, ctx["params32"])
    worst = compare(metrics, ref_terms, trainer.cfg)
    # off a GPU the timed program is this one (same dtype, batch, remat): kept, with the state it returned
    if not on_gpu and args.check_batch == ctx["batches"][0]:
        ctx["checked"] = (step, tx, state, compiled, traced, compile_s, tfn)
    return {"equal": True, "check_batch": args.check_batch, "precision": "float32", "rtol": LOSS_RTOL,
            "losses": len(ref_terms) + 1, "worst_loss": worst[0], "worst_relative": worst[1]}


def compile_step(step, state, batch, params):
    """(compiled, traced, seconds): one ahead-of-time compile, run and measured as is."""
    t0 = time.perf_counter()
    with jax.set_mesh(step.mesh):
        traced = step.jitted.trace(state, batch, params)
        compiled = traced.lower().compile()
    return compiled, traced, time.perf_counter() - t0


def _is_oom(err: Exception) -> bool:
    text = f"{type(err).__name__}: {err}"
    return "OutOfMemory" in text or "out of memory" in text or "RESOURCE_EXHAUSTED" in text


def time_both(args, mods, ctx: dict, b: int) -> dict:
    """Warm-up, then interleaved rounds of each at batch b, in the timing precisions; per-iteration seconds."""
    import torch

    from gpfm_jax.plan import roofline

    on_gpu, trainer = ctx["on_gpu"], ctx["trainer"]
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    data, batch = S.batch_for(mods, trainer, b, ctx["device"])
    experts, params = ctx["experts"], ctx["params"]
    checked = ctx.pop("checked", None) if b == args.check_batch else None
    tfn = checked[-1] if checked else S.targets_fn(experts, ctx["grid"])
    held = {"it": 0, "targets_s": []}

    def official_iter():
        t0 = time.perf_counter()
        t = jax.block_until_ready(tfn(params, batch[GLOBAL_CROPS]))
        ctx["targets_ref"]["current"] = jax.tree_util.tree_map(torch.from_dlpack, t)
        held["targets_s"].append(time.perf_counter() - t0)
        trainer.step(data, held["it"])  # schedules hold their final value past the end
        held["it"] += 1

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):  # first: a batch too large for torch fails before the JAX compile
        official_iter()
    sync()
    if checked:
        step, tx, held["state"], compiled, traced, compile_s, _ = checked
    else:
        tx, held["state"] = S.jax_state(ctx["twin"], trainer, ctx["s"])
        step = S.jax_step(ctx["twin"], tx, held["state"], experts, params, dtype=ctx["dtype"],
                          drop_path=ctx["s"]["drop_path"], remat=ctx["remat"], max_masked=int(data["upperbound"]))
        compiled, traced, compile_s = compile_step(step, held["state"], batch, params)
    if ctx["remat"] != "none":  # model FLOPs: the same step without recomputation (traced only)
        with jax.set_mesh(step.mesh):
            traced = S.jax_step(ctx["twin"], tx, held["state"], experts, params, dtype=ctx["dtype"], remat="none",
                                drop_path=ctx["s"]["drop_path"], max_masked=int(data["upperbound"])
                                ).jitted.trace(held["state"], batch, params)
    model_flops = roofline.jaxpr_flops(traced.jaxpr)
    mem = compiled.memory_analysis()

    def ours_iter():
        held["state"], metrics = compiled(held["state"], batch, params)
        return metrics

    for _ in range(args.warmup):
        jax.block_until_ready(ours_iter())
    rounds = {"official": [], "gpfm_jax": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.iters):
            official_iter()
        sync()
        rounds["official"].append((time.perf_counter() - t0) / args.iters)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            metrics = ours_iter()
        jax.block_until_ready((held["state"], metrics))
        rounds["gpfm_jax"].append((time.perf_counter() - t0) / args.iters)
    step_s = {k: statistics.median(v) for k, v in rounds.items()}
    out = {"batch": b, "iteration_s": step_s, "rounds_s": rounds, "jax_compile_s": round(compile_s, 2),
           "img_per_s": {k: b / v for k, v in step_s.items()}, "model_flops_per_step": model_flops,
           "official_teacher_targets_s": statistics.median(held["targets_s"]),  # gpfm_jax's teachers, inside
           "jax_program_bytes": mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
           - mem.alias_size_in_bytes, "last_loss": float(metrics["loss/total"])}
    out["ratio"] = out["img_per_s"]["gpfm_jax"] / out["img_per_s"]["official"]
    if on_gpu:
        out["peak_bytes"] = {"official": torch.cuda.max_memory_allocated(),
                             "gpfm_jax": (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")}
    else:
        out["max_rss_bytes_both"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if ctx["peak"]:
        out["mfu"] = {k: model_flops / v / ctx["peak"] for k, v in step_s.items()}
    return out


def run(args) -> dict:
    import torch

    dev = jax.local_devices()[0]
    on_gpu = dev.platform == "gpu"
    O.install_xformers_standin(sdpa=on_gpu)
    mods = O.oracle()  # one torch thread, as the oracle tests (torch's pool stalls beside JAX's: 20x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads or threads)
    try:
        return _run(args, mods, dev, on_gpu)
    finally:
        torch.set_num_threads(threads)


def _run(args, mods, dev, on_gpu: bool) -> dict:
    import torch

    from gpfm_jax.plan.targets import peak_bf16_for

    _test_helpers()
    s = SIZES[args.size]
    experts32, params32 = S.build_experts(args.size, "float32")
    device = "cuda" if on_gpu else "cpu"
    batches = [int(x) for x in (args.batches or s["batches"]).split(",")]
    args.batches = ",".join(map(str, batches))
    trainer, heads, targets_ref, twin = S.official(args, mods, s, device, experts32)
    ctx = dict(trainer=trainer, twin=twin, on_gpu=on_gpu, device=device, s=s, experts32=experts32,
               params32=params32, targets_ref=targets_ref, grid=(s["img"] // 14,) * 2, batches=batches,
               remat=args.remat or ("dots_saveable" if on_gpu else "none"),
               dtype="bfloat16" if on_gpu else "float32", peak=peak_bf16_for(dev.device_kind) if on_gpu else None)
    official_dtype = args.official_dtype if on_gpu else "float32"
    result = {"device": dev.device_kind, "backend": dev.platform, "jax": jax.__version__, "torch": torch.__version__,
              "size": args.size, "dims": {k: v for k, v in s.items() if k != "batches"},
              "official": f"dinov2 0.0.1.dev2 SSLMetaArch + GPFM distillation, autocast {official_dtype}"
              + (" + GradScaler" if official_dtype == "float16" else "") + (", SDPA attention" if on_gpu else ""),
              "gpfm_jax": f"{ctx['dtype']} compute, fp32 params, attention auto, remat {ctx['remat']}, "
              "concatenated crops, scanned blocks"}
    result["check"] = check_equal(args, mods, ctx, args.perturb)
    if args.json:  # kept if the timing is cut short
        _write(Path(args.json), {**result, "timing": None})
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # dinov2/train/train.py
        ctx["experts"], ctx["params"] = S.build_experts(args.size, "bfloat16", params=params32)
        if official_dtype != "float32":
            dtype = getattr(torch, official_dtype)
            trainer.autocast = lambda: torch.autocast("cuda", dtype=dtype)
            if official_dtype == "float16":
                trainer.scaler = trainer.model.fp16_scaler = torch.amp.GradScaler("cuda")
    else:
        ctx["experts"], ctx["params"] = experts32, params32
    tried = []
    for b in batches:
        try:
            result["timing"] = time_both(args, mods, ctx, b)
            break
        except Exception as err:  # noqa: BLE001 - a batch that does not fit: the next one
            if not (on_gpu and _is_oom(err)):
                raise
            tried.append({"batch": b, "error": f"{type(err).__name__}: {err}"[:300]})
            ctx.pop("checked", None)
            torch.cuda.empty_cache()
            jax.clear_caches()
    result["batches_tried"] = tried
    if "timing" not in result:
        raise RuntimeError(f"no batch of {args.batches} fits both steps: {tried}")
    return result


def summary(r: dict) -> list[str]:
    t, c = r["timing"], r["check"]
    lines = [f"device: {r['device']} ({r['backend']}); size {r['size']}; batch {t['batch']}"
             + (f" (the largest of {','.join(str(x['batch']) for x in r['batches_tried'])},{t['batch']} both fit)"
                if r["batches_tried"] else ""),
             f"equal: {c['losses']} losses within {c['rtol']:g} relative (worst {c['worst_loss']}: "
             f"{c['worst_relative']:.1e}), fp32, {c['check_batch']} images"]
    for side in ("official", "gpfm_jax"):
        mem = (f", peak {t['peak_bytes'][side] / 2**30:.1f} GiB" if "peak_bytes" in t and t["peak_bytes"][side]
               else "")
        mfu = f", MFU {t['mfu'][side]:.1%}" if "mfu" in t else ""
        lines.append(f"{side:9s} {t['img_per_s'][side]:9.2f} img/s ({t['iteration_s'][side] * 1e3:.1f} ms/step)"
                     f"{mfu}{mem}: {r[side]}")
    if "max_rss_bytes_both" in t:
        lines.append(f"memory: this process's max RSS {t['max_rss_bytes_both'] / 2**30:.2f} GiB (both steps together)")
    lines.append(f"ratio gpfm_jax / official: {t['ratio']:.3f}")
    if r["backend"] == "cpu":
        lines.append("caveat: CPU figures; neither code runs on a CPU for real, the ratio says nothing of a GPU")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: vitl on a GPU, tiny elsewhere")
    p.add_argument("--batches", default=None, help="per-device batches to try, largest first (GPU: the first "
                   "both fit); default: the size's")
    p.add_argument("--check-batch", type=int, default=None, help="images of the fp32 equality step")
    p.add_argument("--official-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="the official step's autocast dtype on a GPU (GPFM: float16 with loss scaling)")
    p.add_argument("--remat", default=None, help="gpfm_jax's remat policy (GPU default: the config's dots_saveable)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=5, help="steps of each per round")
    p.add_argument("--torch-threads", type=int, default=None, help="default: the oracle's one thread (on 2 shared "
                   "cores, 2 threads made the official step 20x slower beside JAX)")
    p.add_argument("--perturb", choices=PERTURBATIONS, default=None,
                   help="make the steps unequal on purpose (a weight of the official student x1.1, or the official "
                   "KoLeo weight doubled): proves the refusal")
    p.add_argument("--json", default=None, help="write the figures (or the refusal) here")
    args = p.parse_args(argv)
    args.size = args.size or ("vitl" if jax.default_backend() == "gpu" else "tiny")
    args.check_batch = args.check_batch or SIZES[args.size]["check_batch"]
    try:
        result = run(args)
    except Refused as err:
        print(err, flush=True)
        if args.json:
            _write(Path(args.json), {"equal": False, "refused": str(err)})
        return 2
    for line in summary(result):
        print(line, flush=True)
    if args.json:
        _write(Path(args.json), result)
    return 0


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
