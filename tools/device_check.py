#!/usr/bin/env python
"""A prepared check for a GPU machine (issue 11), one command, one JSON, about 3-6 minutes on one H100/H200.

    pip install -e ".[gpu,test]"     # jax[cuda13] (+ torch 2.14.1 / timm, which share the CUDA 13 libraries)
    python tools/device_check.py --out $OUT/device_check.json

Needs: the repo (configs/, tests/data/ images), jax with a CUDA plugin, torch + timm for the comparison; no network,
no weights (everything is randomly initialised). The JSON is rewritten atomically after every section, so a failure
or a timeout keeps what was measured before; a failing section records its error and the next one runs.

Sections, in order:
  env         jax / torch versions, devices, device kind and its published dense bf16 peak.
  step        the official step (configs/gpfm_vitl14.py: ViT-L/14 student + UNI / Phikon / CONCH at their real sizes,
              bf16, the config's remat policy) at the planned per-device batch (--per-device-batch, default the
              config's recipe: 96) on every local GPU, random weights and data on device: compile time, then
              --iters timed iterations after --warmup: s/iteration, images/s per GPU, MFU against the dense bf16
              peak (model FLOPs, no recomputation), peak memory. Beside it, gpfm-plan's figures for the same
              compiled program: predicted peak memory and the roofline images/s at the planner's assumed MFU.
  attention   cuDNN flash attention (tokens padded to even length, keys masked) vs XLA attention at ViT-L's training
              shapes (257 tokens, 16 heads of 64), bf16: max |difference| of outputs and input gradients, and
              forward+backward time of each.
  extraction  encoder throughput, tiles/s: gpfm_jax (bf16 compute, uint8 in, normalisation on device) vs timm
              `vit_large_patch14_dinov2` (torch.autocast bf16) on the same GPU, same weights, interleaved runs.
  features    the same encoder on real H&E tiles (tests/data): JAX bf16 vs JAX fp32 (cosine, max |diff| relative to
              the feature norm) and JAX fp32 vs timm fp32 (TF32 off on both sides).
Added by --profile / --train (alone, with env, unless --sections names more; issue 19):
  profile     the step section's program traced for --profile-steps steps (jax.profiler): profile_ops.json / .md
              beside the JSON, the top 30 ops by device time (category, ms/step, share, count), device busy vs wall
              (tools/profile_ops.py). ~1-2 min: python tools/device_check.py --profile --out $OUT/profile.json
  train       gpfm-train itself, 50 iterations, official model, random-weight UNI / Phikon / CONCH bundles, tiles
              from the bundled slide through grain workers: end-to-end and step-only img/s, device idle share,
              host cores (tools/device_train.py). ~3-6 min: ... --train --out $OUT/train.json
--tiny runs every section at toy sizes on whatever backend jax has (the test suite runs it on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in the later sections
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

TIMM_ARCH = "vit_large_patch14_dinov2"
TINY_VIT = dict(img_size=56, embed_dim=64, depth=2, num_heads=4)


class Report:
    """The JSON document, rewritten (temp file + rename) after every section."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        start = time.perf_counter()
        print(f"[device_check] {name} ...", flush=True)
        try:
            result = {"ok": True, **fn()}
        except Exception as err:  # noqa: BLE001 - record and carry on with the next section
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        self.data["sections"][name] = result
        self.write()
        print(f"[device_check] {name}: {json.dumps(_brief(result))}", flush=True)

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_json_default) + "\n")
        os.replace(tmp, self.path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "traceback" and not isinstance(v, (dict, list))}


def _devices(n: int | None) -> list:
    devices = jax.local_devices()
    return devices[:n] if n else devices


def _peak(device) -> float | None:
    from gpfm_jax.plan.targets import peak_bf16_for

    return peak_bf16_for(device.device_kind)


# ---------------------------------------------------------------------------------------------------------------


def env_section(devices: list) -> dict[str, Any]:
    info = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "devices": len(devices), "peak_bf16_flops": _peak(devices[0])}
    stats = devices[0].memory_stats() or {}
    info["bytes_limit"] = stats.get("bytes_limit")
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        info["torch"] = None
    return info


def _local_target(devices: list, tiny: bool):
    from gpfm_jax.plan.targets import TARGETS, Target

    d = devices[0]
    stats = d.memory_stats() or {}
    peak = _peak(d) or TARGETS["cpu-8"].peak_bf16_flops
    return Target(name=f"local-{len(devices)}x-{d.device_kind}", platform=d.platform, chips=len(devices), hosts=1,
                  hbm_bytes=int(stats.get("bytes_limit") or TARGETS["cpu-8"].hbm_bytes), peak_bf16_flops=peak,
                  link_bytes_per_s=450e9, island_size=len(devices))


def _step_config(tiny: bool, num_devices: int):
    """The typed config of the step to time: the official recipe (FSDP over 8, or what this host has), or with
    --tiny the demo shrunk further (one block, narrow heads, two local crops)."""
    from gpfm_jax.plan.cli import load_config
    from gpfm_jax.train.config_schema import parse

    cfg = load_config(REPO / "configs" / ("demo.py" if tiny else "gpfm_vitl14.py"))
    if tiny:
        cfg.model.vit.update(dict(depth=1, embed_dim=32, num_heads=2))
        cfg.model.heads.update(dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, distill_bottleneck_dim=16))
        cfg.standin.update(dict(embed_dim=16, depth=1, num_heads=2, pooler_dim=16))
        cfg.data.multicrop.num_local_crops = 2
    cfg.mesh.fsdp = math.gcd(int(cfg.mesh.fsdp), num_devices)
    return parse(cfg)


# The step compiles once per run (--profile traces the step section's program, from its last state): key -> the
# compiled tuple, and the latest (state, batch, experts) handed back by the section that used them.
_COMPILED: dict[tuple, tuple] = {}
_INPUTS: dict[tuple, tuple] = {}


def _compiled_step(devices: list, args: argparse.Namespace):
    """(cfg, target, per-device batch, built, traced, compiled, compile_s, (state, data, experts)): the step
    section's program, also what --profile traces. The step donates its state: a caller that keeps stepping hands
    the latest inputs back with `_keep_inputs`, else the next caller gets fresh ones (materialize compiles too)."""
    from gpfm_jax.plan import compile as compile_lib

    key = (tuple(devices), args.tiny, args.per_device_batch)
    if key not in _COMPILED:
        _INPUTS.clear()
        cfg = _step_config(args.tiny, len(devices))
        target = _local_target(devices, args.tiny)
        batch = args.per_device_batch or (2 if args.tiny else 96)
        built = compile_lib.build(cfg, target, batch, standin_teachers=args.tiny, devices=devices)
        t0 = time.perf_counter()
        with jax.set_mesh(built.step.mesh):
            traced = built.step.jitted.trace(*compile_lib.materialize(built))
            compiled = traced.lower().compile()
        _COMPILED.clear()
        _COMPILED[key] = (cfg, target, batch, built, traced, compiled, time.perf_counter() - t0)
    inputs = _INPUTS.pop(key, None) or compile_lib.materialize(_COMPILED[key][3])
    return (*_COMPILED[key], inputs)


def _keep_inputs(devices: list, args: argparse.Namespace, inputs: tuple) -> None:
    _INPUTS[(tuple(devices), args.tiny, args.per_device_batch)] = inputs


def step_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    from gpfm_jax.plan import analysis, roofline

    cfg, target, batch, built, traced, compiled, compile_s, (state, data, experts) = _compiled_step(devices, args)
    flops = roofline.jaxpr_flops(traced.jaxpr)
    model_flops = flops if built.cfg.compute.remat_policy == "none" else analysis.traced_flops(
        cfg, target, batch, "none", args.tiny, devices)
    predicted_peak = analysis.memory_of(compiled, target, 0.0).peak
    for _ in range(args.warmup):
        state, metrics = compiled(state, data, experts)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        state, metrics = compiled(state, data, experts)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / args.iters
    _keep_inputs(devices, args, (state, data, experts))
    n = len(devices)
    img_s = batch / step_s
    mfu = model_flops / n / step_s / target.peak_bf16_flops
    stats = devices[0].memory_stats() or {}
    hlo = compiled.as_text()
    summary = roofline.summarize(roofline.parse_collectives(hlo, n), target)
    roof = roofline.roofline(flops, summary.seconds, batch, target, analysis.DEFAULT_MFU, analysis.RELEASED_SAMPLES)
    return {
        "config": "configs/demo.py shrunk, stand-in teachers" if args.tiny else "configs/gpfm_vitl14.py",
        "per_device_batch": batch, "devices": n, "mesh": built.mesh_shape, "remat": built.cfg.compute.remat_policy,
        "attention_impl": built.cfg.model.vit.attention_impl, "compute_dtype": built.cfg.compute.dtype,
        "compile_s": round(compile_s, 2), "iters": args.iters, "step_s": step_s, "img_per_s_per_device": img_s,
        "model_flops_per_step": model_flops, "executed_flops_per_step": flops, "mfu": mfu,
        "peak_bf16_flops": target.peak_bf16_flops, "loss": float(metrics["loss/total"]),
        "measured_peak_bytes": stats.get("peak_bytes_in_use"),
        "planner": {"peak_bytes": predicted_peak, "assumed_mfu": analysis.DEFAULT_MFU,
                    "img_per_s_per_device": roof.img_per_s_per_chip, "step_s": roof.step_s,
                    "collective_bytes": sum(summary.bytes_by_kind.values())},
    }


def profile_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    """The step section's program traced for --profile-steps steps; the per-op table (tools/profile_ops.py) goes
    beside the --out JSON as profile_ops.json / profile_ops.md."""
    from tools import profile_ops

    _, _, batch, built, _, compiled, compile_s, inputs = _compiled_step(devices, args)
    title = (f"Where the step's time goes: {built.cfg.model.vit.embed_dim}-wide ViT, {batch} images/device, "
             f"remat {built.cfg.compute.remat_policy}, {devices[0].device_kind} x{len(devices)}")
    result = profile_ops.profile_step(compiled, inputs, args.profile_steps, max(1, args.warmup), Path(args.out).parent,
                                      title)
    return {"per_device_batch": batch, "compile_s": round(compile_s, 2), **result}


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    from gpfm_jax.models import attention

    on_gpu = devices[0].platform == "gpu"
    b, n, h, d = (2, 9, 2, 8) if args.tiny else (64, 257, 16, 64)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    flash = "cudnn" if on_gpu else "xla"  # off a GPU: the same padding + key mask through XLA
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(kk, (b, n, h, d), jnp.float32).astype(dtype) for kk in keys)

    def run(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    padded = jax.jit(lambda: run(lambda q, k, v: attention.padded_attention(q, k, v, flash)))
    plain = jax.jit(lambda: run(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")))
    got, want = padded(), plain()
    diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - w.astype(jnp.float32)))) for a, w in zip(got, want)]
    scale = [float(jnp.max(jnp.abs(w.astype(jnp.float32)))) for w in want]
    repeats = 3 if args.tiny else 20
    t_flash = _time(lambda: jax.block_until_ready(padded()), repeats)
    t_xla = _time(lambda: jax.block_until_ready(plain()), repeats)
    return {"impl": f"{flash} (padded to even, key mask)", "shape_bthd": [b, n, h, d], "dtype": jnp.dtype(dtype).name,
            "max_abs_diff": dict(zip(("out", "dq", "dk", "dv"), diffs)),
            "max_abs_reference": dict(zip(("out", "dq", "dk", "dv"), scale)),
            "fwd_bwd_s": {"flash": t_flash, "xla": t_xla}, "speedup": t_xla / t_flash}


def _timm_model(tiny: bool):
    import timm
    import torch

    torch.manual_seed(0)
    kwargs = dict(img_size=224, init_values=1e-5, num_classes=0)
    if tiny:
        kwargs.update(TINY_VIT)
    model = timm.create_model(TIMM_ARCH, **kwargs)
    with torch.no_grad():  # non-trivial LayerScales, so every block matters
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _jax_encoder(model_t, tiny: bool, dtype: str):
    from gpfm_jax.convert.torch_io import tensor_to_numpy
    from gpfm_jax.convert.vit_keys import canonical_keys, vit_params_from_torch
    from gpfm_jax.models.vit import ViTConfig, VisionTransformer

    state, _ = canonical_keys({k: tensor_to_numpy(v) for k, v in model_t.state_dict().items()}, "timm")
    cfg = ViTConfig(**(TINY_VIT if tiny else {}), dtype=dtype)
    params = jax.device_put(vit_params_from_torch(state, cfg, "timm"))
    module = VisionTransformer(cfg)
    mean = jnp.asarray((0.485, 0.456, 0.406), jnp.float32)
    std = jnp.asarray((0.229, 0.224, 0.225), jnp.float32)

    @jax.jit
    def forward(p, tiles_uint8):  # what gpfm-extract runs: uint8 in, normalisation on device
        x = (tiles_uint8.astype(jnp.float32) / 255.0 - mean) / std
        return module.apply({"params": p}, x.astype(dtype))["cls"].astype(jnp.float32)

    return lambda tiles: forward(params, tiles), cfg.img_size


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extraction_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    dev = _torch_device()
    model_t = _timm_model(args.tiny)
    jax_fn, size = _jax_encoder(model_t, args.tiny, "bfloat16")
    model_t = model_t.to(dev)
    batch = 4 if args.tiny else args.extract_batch
    tiles = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    tiles_dev = jax.device_put(tiles, devices[0])
    mean = torch.tensor((0.485, 0.456, 0.406), device=dev).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=dev).view(1, 3, 1, 1)
    tiles_t = torch.from_numpy(tiles).to(dev)

    def run_timm():
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
            x = (tiles_t.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            out = model_t(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    def run_jax():
        return jax.block_until_ready(jax_fn(tiles_dev))

    run_jax(), run_timm()  # compile / first-call costs
    rounds = 2 if args.tiny else 5
    t_jax, t_timm = [], []
    for _ in range(rounds):  # interleaved, so machine noise hits both
        t_jax.append(_time(run_jax, 1 if args.tiny else 5))
        t_timm.append(_time(run_timm, 1 if args.tiny else 5))
    jax_tps, timm_tps = batch / statistics.median(t_jax), batch / statistics.median(t_timm)
    return {"model": TIMM_ARCH + (" (tiny)" if args.tiny else ""), "batch": batch, "dtype": "bfloat16",
            "jax_tiles_per_s": jax_tps, "timm_tiles_per_s": timm_tps, "jax_over_timm": jax_tps / timm_tps}


def _real_tiles(size: int, count: int) -> np.ndarray:
    from PIL import Image

    big = np.asarray(Image.open(REPO / "tests" / "data" / "tiatoolbox_target_image.png").convert("RGB"))
    crops = [big[y: y + 250, x: x + 250] for y in range(0, 750, 250) for x in range(0, 750, 250)][:count]
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in crops])


def features_section(devices: list, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    dev = _torch_device()
    model_t = _timm_model(args.tiny)
    f32_fn, size = _jax_encoder(model_t, args.tiny, "float32")
    bf16_fn, _ = _jax_encoder(model_t, args.tiny, "bfloat16")
    tiles = _real_tiles(size, 9)
    with jax.default_matmul_precision("highest"):
        f32 = np.asarray(f32_fn(tiles))
    bf16 = np.asarray(bf16_fn(tiles))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        x = torch.from_numpy(tiles).to(dev).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor((0.485, 0.456, 0.406), device=dev).view(1, 3, 1, 1)) / torch.tensor(
            (0.229, 0.224, 0.225), device=dev).view(1, 3, 1, 1)
        ref = model_t.to(dev)(x).float().cpu().numpy()

    def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        rel = np.max(np.abs(a - b), -1) / np.linalg.norm(b, axis=-1)
        return {"min_cosine": float(cos.min()), "max_abs_diff_over_norm": float(rel.max())}

    return {"tiles": len(tiles), "feature_dim": int(f32.shape[1]), "bf16_vs_fp32": compare(bf16, f32),
            "jax_fp32_vs_timm_fp32": compare(f32, ref)}


def main(argv: list[str] | None = None) -> int:
    from tools import device_train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file (the lead passes $OUT/device_check.json)")
    parser.add_argument("--per-device-batch", type=int, default=None, help="default: 96 (the recipe); tiny: 2")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--extract-batch", type=int, default=256)
    parser.add_argument("--devices", type=int, default=None, help="use the first N local devices (default all)")
    parser.add_argument("--sections", default=None, help="default: env,step,attention,extraction,features; "
                        "with --profile / --train and no --sections: env and those")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU test)")
    parser.add_argument("--profile", action="store_true", help="add the profile section (per-op table)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps traced by --profile")
    parser.add_argument("--train", action="store_true", help="add the train section (gpfm-train end to end)")
    device_train.add_arguments(parser)
    args = parser.parse_args(argv)
    extra = [name for name, on in (("profile", args.profile), ("train", args.train)) if on]
    if args.sections is None:
        args.sections = ",".join(["env", *extra]) if extra else "env,step,attention,extraction,features"
    else:
        args.sections = ",".join([*args.sections.split(","), *(e for e in extra if e not in args.sections.split(","))])
    devices = _devices(args.devices)
    report = Report(Path(args.out))
    report.data["argv"] = sys.argv[1:] if argv is None else list(argv)
    report.data["tiny"] = args.tiny
    sections = {
        "env": lambda: env_section(devices),
        "step": lambda: step_section(devices, args),
        "attention": lambda: attention_section(devices, args),
        "extraction": lambda: extraction_section(devices, args),
        "features": lambda: features_section(devices, args),
        "profile": lambda: profile_section(devices, args),
        "train": lambda: device_train.section(Path(args.out).parent, args, len(devices)),
    }
    for name in args.sections.split(","):
        if name not in sections:
            parser.error(f"unknown section {name!r}; known: {', '.join(sections)}")
        report.section(name, sections[name])
    failed = [k for k, v in report.data["sections"].items() if not v["ok"]]
    print(f"[device_check] wrote {args.out}" + (f"; failed sections: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
