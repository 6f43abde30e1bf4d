"""One plan point: compile the step for (config, target, batch, remat) and read off memory, FLOPs, collectives and
the roofline; `format_report` prints it. A TPU program that does not fit is refused by libtpu at compile time:
its message ("HLO temporaries (134.79G) exceeds available HBM (95.74G)") becomes the peak figure and fits=False."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax

from gpfm_jax.plan import compile as compile_lib
from gpfm_jax.plan import roofline as roofline_lib
from gpfm_jax.plan import targets as targets_lib
from gpfm_jax.plan.targets import GiB, Target
from gpfm_jax.train.config_schema import TrainConfig

RELEASED_SAMPLES = 87_500 * 1536  # the released GPFM checkpoint: iteration 87,500 at 1,536 images (134.4M)
DEFAULT_MFU = 0.3  # measured on one H200 by tools/device_check.py: 29.5% for the official step (docs/plan.md)
DEFAULT_MARGIN = 0.1  # keep this share of HBM free (fragmentation, runtime buffers, the input pipeline)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# libtpu's refusals (units are GiB-style powers of two): "Used 134.8G of 95.74G hbm" / "the total memory required
# for HLO temporaries (134.79G) exceeds available HBM (95.74G)"
_TPU_OOM = re.compile(r"(?:Used |HLO temporaries \()([\d.]+)([KMGT])\)? (?:of|exceeds available HBM \()")


@dataclasses.dataclass
class Memory:
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    peak: int  # argument + output - alias + temp + code
    limit: int  # HBM x (1 - margin)
    fits: bool


@dataclasses.dataclass
class PlanResult:
    target: str
    per_device_batch: int
    remat: str
    mesh: dict[str, int]
    compute_dtype: str
    attention_impl: str
    param_bytes: dict[str, int]
    memory: Memory
    flops_per_step: float  # executed (remat recomputation included)
    model_flops_per_step: float  # without recomputation (the MFU numerator)
    collectives: roofline_lib.CollectiveSummary | None
    roofline: roofline_lib.Roofline | None
    trace_s: float
    compile_s: float
    error: str = ""  # a compile failure other than out-of-memory
    microbatches: int = 1  # config.step.microbatches: the per-device batch runs as this many sequential chunks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def collective_bytes(self) -> float:
        return sum(self.collectives.bytes_by_kind.values()) if self.collectives else float("nan")


def memory_of(compiled: Any, target: Target, margin: float) -> Memory:
    m = compiled.memory_analysis()
    code = int(getattr(m, "generated_code_size_in_bytes", 0) or 0)
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes + code
    limit = int(target.hbm_bytes * (1 - margin))
    return Memory(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes,
                  code, int(peak), limit, peak <= limit)


def _oom_memory(message: str, target: Target, margin: float) -> Memory | None:
    m = _TPU_OOM.search(message)
    if not m:
        return None
    used = int(float(m.group(1)) * _UNITS[m.group(2)])
    return Memory(0, 0, 0, 0, 0, used, int(target.hbm_bytes * (1 - margin)), False)


def traced_flops(cfg: TrainConfig, target: Target, per_device_batch: int | None, remat: str | None,
                 standin_teachers: bool, devices: list) -> float:
    """Matmul FLOPs per step of the step traced for this point (no compile); remat "none" gives the model FLOPs."""
    built = compile_lib.build(cfg, target, per_device_batch, remat, standin_teachers, devices=devices)
    with jax.set_mesh(built.step.mesh):
        traced = built.step.jitted.trace(*built.args)
    return roofline_lib.jaxpr_flops(traced.jaxpr)


def plan_point(cfg: TrainConfig, target: Target, per_device_batch: int | None = None,
               remat: str | None = None, standin_teachers: bool = False, mfu: float = DEFAULT_MFU,
               samples: float = RELEASED_SAMPLES, margin: float = DEFAULT_MARGIN, devices: list | None = None,
               keep_hlo: list | None = None) -> PlanResult:
    """Compile one point and analyse it. `keep_hlo`, if a list, receives the compiled HLO text."""
    devices = targets_lib.devices(target) if devices is None else devices
    built = compile_lib.build(cfg, target, per_device_batch, remat, standin_teachers, devices=devices)
    c = built.cfg
    base = dict(target=target.name, per_device_batch=built.per_device_batch, microbatches=c.step.microbatches,
                remat=c.compute.remat_policy,
                mesh=built.mesh_shape, compute_dtype=built.resolved.compute_dtype,
                attention_impl=built.resolved.vit.attention_impl,
                param_bytes=built.param_bytes)
    try:
        result = compile_lib.compile_built(built)
    except Exception as err:  # noqa: BLE001 - an out-of-memory compile is a result, other failures are reported
        message = str(err)
        memory = _oom_memory(message, target, margin)
        if memory is None:
            memory = Memory(0, 0, 0, 0, 0, 0, int(target.hbm_bytes * (1 - margin)), False)
        error = "" if _TPU_OOM.search(message) else message.strip().splitlines()[0][:500]
        return PlanResult(**base, memory=memory, flops_per_step=float("nan"), model_flops_per_step=float("nan"),
                          collectives=None, roofline=None, trace_s=float("nan"), compile_s=float("nan"), error=error)
    flops = roofline_lib.jaxpr_flops(result.traced.jaxpr)
    mflops = flops if base["remat"] == "none" else traced_flops(cfg, target, built.per_device_batch, "none",
                                                                standin_teachers, devices)
    hlo = result.compiled.as_text()
    if keep_hlo is not None:
        keep_hlo.append(hlo)
    mesh_devices = list(built.step.mesh.devices.flat)
    # partition i runs on mesh device i; islands with a slower network between them are hosts (GPU nodes)
    islands = [d.process_index for d in mesh_devices] if target.dcn_bytes_per_s else None
    summary = roofline_lib.summarize(roofline_lib.parse_collectives(hlo, target.chips, islands), target)
    roof = roofline_lib.roofline(flops, summary.seconds, built.per_device_batch, target, mfu, samples)
    return PlanResult(**base, memory=memory_of(result.compiled, target, margin), flops_per_step=flops,
                      model_flops_per_step=mflops, collectives=summary, roofline=roof, trace_s=result.trace_s,
                      compile_s=result.compile_s)


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _short(op_name: str, width: int = 90) -> str:
    if op_name.startswith("jit(") and "/(" in op_name:  # a combined op: "jit(f)/(a:b:c...)"
        parts = op_name.split("/(", 1)[1].rstrip(")").split(":")
        op_name = f"{len(parts)} combined ops, e.g. {parts[0]}"
    return op_name if len(op_name) <= width else op_name[: width - 3] + "..."


def format_report(r: PlanResult, target: Target) -> str:
    m = r.memory
    lines = [f"gpfm-plan: {r.target} ({target.chips} chips, {target.hosts} host(s)), mesh {r.mesh}, "
             f"{r.per_device_batch} images/device"
             + (f" in {r.microbatches} microbatches of {r.per_device_batch // r.microbatches}" if r.microbatches > 1
                else "") + f", remat {r.remat}, {r.compute_dtype}, attention {r.attention_impl}"]
    if target.platform == "cpu":  # fake host devices: the program is real, the memory / speed figures are not
        lines.append(f"  NOMINAL: {target.name} is {target.chips} fake CPU devices for testing the planner; its "
                     "HBM limit, peak FLOP/s and link speed are made-up figures, so 'fits' and the roofline below "
                     "say nothing about a real machine (use a TPU or GPU target)")
    params = ", ".join(f"{k} {_gib(v)}" for k, v in r.param_bytes.items())
    lines.append(f"  parameters (stored, global): {params}")
    if r.error:
        lines.append(f"  COMPILE FAILED: {r.error}")
        return "\n".join(lines)
    verdict = "fits" if m.fits else "DOES NOT FIT"
    if m.argument or m.temp:
        lines.append(f"  memory per device: arguments {_gib(m.argument)}, outputs {_gib(m.output)} (aliased "
                     f"{_gib(m.alias)}), temporaries {_gib(m.temp)}, code {_gib(m.code)}")
    lines.append(f"  peak {_gib(m.peak)} vs {_gib(m.limit)} usable ({_gib(target.hbm_bytes)} HBM less the margin): "
                 f"{verdict}")
    if r.collectives is None:
        return "\n".join(lines)
    lines.append(f"  FLOPs per step: {r.flops_per_step:.4g} executed, {r.model_flops_per_step:.4g} model "
                 f"(per device {r.flops_per_step / target.chips:.4g})")
    kinds = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(r.collectives.bytes_by_kind.items()))
    total = sum(r.collectives.bytes_by_kind.values())
    ratio = total / max(1, sum(r.param_bytes.values()))
    lines.append(f"  collectives per device-step: {_gib(total)} ({ratio:.2f}x the parameter bytes): {kinds}; "
                 f"ring link traffic {_gib(r.collectives.link_bytes)}")
    for op in r.collectives.top:
        lines.append(f"    {op['kind']:<18} {_gib(op['bytes']):>12}  {_short(op['op_name'])}")
    f = r.roofline
    lines.append(f"  roofline: compute {f.compute_s * 1e3:.1f} ms at {f.mfu:.0%} of {target.peak_bf16_flops / 1e12:.0f}"
                 f" TFLOP/s, communication {f.comm_s * 1e3:.1f} ms; step {f.step_s * 1e3:.1f} ms overlapped "
                 f"({f.step_s_no_overlap * 1e3:.1f} ms not)")
    lines.append(f"  => {f.img_per_s_per_chip:.1f} images/s per chip; {f.samples / 1e6:.1f}M samples in "
                 f"{f.days:.2f} days on {target.chips} chips")
    lines.append(f"  (trace {r.trace_s:.1f} s, compile {r.compile_s:.1f} s)")
    return "\n".join(lines)
