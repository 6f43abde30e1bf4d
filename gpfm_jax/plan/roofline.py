"""FLOPs from the traced program, collective bytes from the compiled one, and the roofline they imply.

XLA's own cost model does not serve here (TPU `optimal_seconds` comes back negative, a scanned body is counted
once, GPU `cost_analysis()` is None), so:
- FLOPs: 2 per multiply-add of every `dot_general` in the step's jaxpr (global, before partitioning), scan bodies
  times their length, remat recomputation included (it is in the jaxpr). Elementwise work is not counted: the
  usual MFU convention. cuDNN attention calls are counted as the two (forward) / five (backward) matmuls they do.
- Collectives: every all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute in the compiled,
  partitioned HLO (so per device), while bodies times their known trip count. "bytes" is the full tensor (the
  gathered result, the reduce-scatter operand); "link bytes" is what a ring moves in and out of one device:
  (n-1)/n of it, twice for an all-reduce. Loops without XLA's trip-count annotation (TPU) have theirs read off the
  loop condition (`i < N`). A group that spans islands (hosts without NVLink between them) is timed
  on the slower network. TPU's async collective fusion runs one collective in steps: each step's fusion
  (`async_collective_fusion.*`, with the start and end in plain fusions) carries the whole collective instruction
  and the same channel_id, so one collective executes once, at the frequency of its least frequent step (counting
  each step as a whole collective made v5e's qkv weight gather in the backward 19x too large; checked against a
  compile without async collective fusion, docs/plan.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from gpfm_jax.plan.targets import Target

# ---------------------------------------------------------------------------------------------------------------
# FLOPs from a jaxpr


def _sub_jaxprs(params: dict) -> Iterable[Any]:
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
    return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _attention_flops(eqn, backward: bool) -> float:
    """cuDNN attention in jax's BTNH layout: q (b, t, heads, hd), k (b, s, heads, hd). Forward QK^T and PV; backward
    recomputes QK^T and forms dV, dP, dQ, dK."""
    b, t, h, d = eqn.invars[0].aval.shape
    s = eqn.invars[1].aval.shape[1]
    return (10.0 if backward else 4.0) * b * h * t * s * d


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of a (closed) jaxpr, recursing into calls, scans (x length), conds (the largest branch),
    remat, custom_vjp / custom_jvp and shard_map bodies."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if "dot_product_attention" in name and "fwd" in name:
            total += _attention_flops(eqn, backward=False)
            continue
        if "dot_product_attention" in name and "bwd" in name:
            total += _attention_flops(eqn, backward=True)
            continue
        subs = [jaxpr_flops(s) for s in _sub_jaxprs(eqn.params)]
        if not subs:
            continue
        if name == "cond":
            total += max(subs)
        elif name == "scan":
            total += eqn.params["length"] * sum(subs)
        else:
            total += sum(subs)
    return total


# ---------------------------------------------------------------------------------------------------------------
# Collectives from compiled HLO text

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_ITEMSIZE, key=len, reverse=True)) + r")\[([\d,]*)\]")
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (arrays and tuples; layouts and tiling ignored)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _ITEMSIZE[dtype]
    return total


def _split_instruction(line: str) -> tuple[str, str, str, str] | None:
    """(name, shape, opcode, rest-after-opcode) of one HLO instruction line."""
    m = _INSTR.match(line)
    if not m:
        return None
    pos = m.end()
    if line[pos] == "(":  # tuple shape: find the matching parenthesis
        depth = 0
        for i in range(pos, len(line)):
            depth += {"(": 1, ")": -1}.get(line[i], 0)
            if depth == 0:
                break
        shape_end = i + 1
    else:
        shape_end = line.index(" ", pos)
    shape = line[pos:shape_end]
    op = re.match(r"\s*([a-z][\w\-]*)\(", line[shape_end:])
    if not op:
        return None
    return m.group(1), shape, op.group(1), line[shape_end + op.end():]


_CONSTANT = re.compile(r"^\s*%([\w.\-]+)\s*=\s*[su]\d+\[\][^ ]*\s+constant\((-?\d+)\)")
_ROOT_COMPARE = re.compile(r"^\s*ROOT\s+%[\w.\-]+\s*=\s*pred\[\][^ ]*\s+compare\(%([\w.\-]+),\s*%([\w.\-]+)\)"
                           r".*direction=(LT|LE|GT|GE)")


def _definitions(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = _INSTR.match(line)
        if m:
            out[m.group(1)] = line
    return out


def _loop_step(body: list[str], index: int, constants: dict[str, str]) -> int:
    """The increment of tuple element `index` in a loop body: ROOT tuple(...)[index] = add(counter, constant k)."""
    defs = _definitions(body)
    root = next((line for line in body if line.lstrip().startswith("ROOT") and " tuple(" in line), None)
    if root is None:
        return 1
    operands = re.findall(r"%([\w.\-]+)", root.split(" tuple(", 1)[1])
    if index >= len(operands):
        return 1
    add = re.search(r"\sadd\(%([\w.\-]+),\s*%([\w.\-]+)\)", defs.get(operands[index], ""))
    if not add:
        return 1
    body_constants = {**constants, **dict(c.groups() for c in map(_CONSTANT.match, body) if c)}
    steps = [int(body_constants[a]) for a in add.groups() if a in body_constants]
    return steps[0] if steps and steps[0] > 0 else 1


def loop_trip_count(while_rest: str, comps: dict[str, list[str]]) -> int | None:
    """A while loop's trip count: XLA's known_trip_count annotation (GPU), else read off the loop: the condition
    `i < N` with a constant N, the body's `i + k` (TPU's windowed-einsum loops are unrolled twice: k = 2), i from 0 (how
    scans and windowed einsums are lowered)."""
    m = _TRIP.search(while_rest)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", while_rest)
    body = re.search(r"body=%([\w.\-]+)", while_rest)
    lines = comps.get(cond.group(1), []) if cond else []
    constants = dict(c.groups() for c in map(_CONSTANT.match, lines) if c)
    defs = _definitions(lines)
    for line in lines:
        m = _ROOT_COMPARE.match(line)
        if not m:
            continue
        lhs, rhs, direction = m.groups()
        if rhs in constants and direction in ("LT", "LE"):
            bound, counter = int(constants[rhs]) + (direction == "LE"), lhs
        elif lhs in constants and direction in ("GT", "GE"):
            bound, counter = int(constants[lhs]) + (direction == "GE"), rhs
        else:
            continue
        index = re.search(r"get-tuple-element\(.*\),\s*index=(\d+)", defs.get(counter, ""))
        step = _loop_step(comps.get(body.group(1), []), int(index.group(1)), constants) if (index and body) else 1
        return -(-bound // step)
    return None


def replica_group_ids(rest: str, num_partitions: int) -> np.ndarray:
    """[groups, size] logical device ids of a collective's replica groups (mesh, iota or explicit form)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        axes = [(a, int(s)) for a, s in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
        names = [a for a, _ in axes]
        chosen = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        ids = np.arange(math.prod(s for _, s in axes)).reshape([s for _, s in axes])
        others = [i for i in range(len(axes)) if i not in chosen]
        size = math.prod(axes[i][1] for i in chosen) if chosen else 1
        return ids.transpose(others + chosen).reshape(-1, size)
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1)
    m = re.search(r"replica_groups=\{(\{[\d,{}\s]*\})\}", rest)
    if m and m.group(1).strip("{} "):
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
        return np.array(groups)
    return np.arange(num_partitions).reshape(1, -1)


@dataclasses.dataclass
class Collective:
    kind: str
    op_name: str
    count: int  # executions per step (loop trip counts)
    bytes: int  # full tensor bytes per execution
    link_bytes: float  # bytes in/out of one device per execution (ring)
    group_size: int
    cross_island: bool
    channel: int | None = None  # channel_id: shared by the steps of one TPU async collective fusion
    in_async_fusion: bool = False


def _link_bytes(kind: str, full: int, n: int) -> float:
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * full * (n - 1) / n
    if kind == "collective-permute":
        return float(full)
    return full * (n - 1) / n


def parse_collectives(hlo: str, num_partitions: int, islands: list[int] | None = None) -> list[Collective]:
    """Every collective the compiled module executes, with its per-step count. `islands[logical id]` names the
    ICI / NVLink domain of each device (None: one domain)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if current is None:
            m = _COMP_HEADER.match(line)
            if m and line.rstrip().endswith("{"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    found: list[Collective] = []
    starts: dict[str, tuple[str, str]] = {}
    unknown_trips: list[str] = []

    def visit(name: str, times: int, depth: int = 0) -> None:
        if depth > 64:
            raise ValueError("HLO call graph deeper than 64")
        for line in comps.get(name, ()):
            parsed = _split_instruction(line)
            if parsed is None:
                continue
            iname, shape, op, rest = parsed
            base = op.removesuffix("-start").removesuffix("-done")
            if base in KINDS:
                if op.endswith("-start"):
                    starts[iname] = (base, rest)
                    continue
                if op.endswith("-done"):
                    operand = re.match(r"\s*%([\w.\-]+)", rest)
                    base, attrs = starts.get(operand.group(1) if operand else "", (base, rest))
                else:
                    attrs = rest
                groups = replica_group_ids(attrs, num_partitions)
                n = groups.shape[1]
                result = shape_bytes(shape)
                full = result * n if base == "reduce-scatter" else result
                cross = False
                if islands is not None and n > 1:
                    cross = any(len({islands[i] for i in g}) > 1 for g in groups)
                op_name = _OP_NAME.search(attrs)
                channel = _CHANNEL.search(attrs)
                found.append(Collective(base, op_name.group(1) if op_name else "(combined by XLA)", times, full,
                                        _link_bytes(base, full, n), n, cross,
                                        int(channel.group(1)) if channel else None,
                                        name.startswith("async_collective_fusion")))
                continue
            if op.endswith("-done"):
                continue
            trip = 1
            if op == "while":
                trip = loop_trip_count(rest, comps)
                if trip is None:
                    unknown_trips.append(iname)
                    trip = 1
            called = _CALLED.findall(rest)
            for group in _CALLED_LIST.findall(rest):
                called += re.findall(r"%([\w.\-]+)", group)
            for callee in called:
                if callee in comps:
                    visit(callee, times * (trip if op == "while" else 1), depth + 1)

    visit(entry, 1)
    if unknown_trips:
        warnings.warn(f"{len(unknown_trips)} while loops without a readable trip count were counted once: "
                      f"{unknown_trips[:5]}", stacklevel=2)
    return merge_async_fusion_steps(found)


def merge_async_fusion_steps(found: list[Collective]) -> list[Collective]:
    """One collective per channel_id where a TPU async collective fusion runs it in steps (module docstring): the
    largest instance, executed as often as the least frequent one."""
    steps: dict[int, list[Collective]] = defaultdict(list)
    for c in found:
        if c.channel is not None:
            steps[c.channel].append(c)
    fused = {ch for ch, cs in steps.items() if len(cs) > 1 and any(c.in_async_fusion for c in cs)}
    out, merged = [], set()
    for c in found:
        if c.channel not in fused:
            out.append(c)
        elif c.channel not in merged:
            merged.add(c.channel)
            group = steps[c.channel]
            out.append(dataclasses.replace(max(group, key=lambda x: x.bytes), count=min(x.count for x in group)))
    return out


@dataclasses.dataclass
class CollectiveSummary:
    bytes_by_kind: dict[str, float]  # full tensor bytes per device-step
    link_bytes: float
    seconds: float  # ring time on the target's links, no overlap between collectives
    top: list[dict[str, Any]]  # the largest ops by bytes per step


def summarize(collectives: list[Collective], target: Target, top: int = 5) -> CollectiveSummary:
    by_kind: dict[str, float] = defaultdict(float)
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    link = seconds = 0.0
    for c in collectives:
        by_kind[c.kind] += c.bytes * c.count
        by_op[(c.kind, c.op_name)] += c.bytes * c.count
        link += c.link_bytes * c.count
        bw = target.dcn_bytes_per_s if (c.cross_island and target.dcn_bytes_per_s) else target.link_bytes_per_s
        seconds += c.link_bytes * c.count / bw
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return CollectiveSummary(dict(by_kind), link, seconds,
                             [{"kind": k, "op_name": n, "bytes": b} for (k, n), b in ranked])


# ---------------------------------------------------------------------------------------------------------------
# The roofline


@dataclasses.dataclass
class Roofline:
    flops_per_device: float
    compute_s: float  # at peak x mfu
    comm_s: float
    step_s: float  # max(compute, comm): communication overlapped with compute
    step_s_no_overlap: float
    img_per_s_per_chip: float
    days: float  # for `samples` images on all the target's chips
    mfu: float
    samples: float


def roofline(flops_per_step: float, comm_s: float, per_device_batch: int, target: Target, mfu: float,
             samples: float) -> Roofline:
    per_device = flops_per_step / target.chips
    compute = per_device / (target.peak_bf16_flops * mfu)
    step = max(compute, comm_s)
    img_s = per_device_batch / step if step > 0 else float("inf")
    days = samples / (img_s * target.chips) / 86400.0
    return Roofline(per_device, compute, comm_s, step, compute + comm_s, img_s, days, mfu, samples)
