"""Where a compiled step's device time goes: a `jax.profiler` trace of a few steps, reduced to a per-op table.

Used by `tools/device_check.py --profile` (issue 19). The trace is read with `jax.profiler.ProfileData` (jax's own
XSpace reader, no TensorBoard / xprof needed on the device machine). Every XLA op execution carries `hlo_op` and
`hlo_module` stats (kernels on a GPU's stream lines; thunks on the XLA client threads of the CPU backend), so the
table keeps only the events of the profiled program's module and groups them by HLO instruction name:

- op time is *exclusive* (a CPU `while` thunk contains its body's ops: they are subtracted from it; GPU kernels are
  leaves), summed over the profiled steps and averaged over the devices;
- `share` is the op's fraction of the summed op time (so shares add up to 1 over all ops, <= 1 over the top N);
- `busy` is the union of op intervals per device (streams overlapping count once), against the steps' wall time
  measured around the traced loop: wall - busy is where the device had nothing of this program to run (launch gaps,
  host work, waits);
- the category comes from the compiled HLO itself (`hlo_modules()`: opcode, fusion kind, custom-call target), so a
  row says "matmul", "attention", "collective", ... without guessing from names.
"""

from __future__ import annotations

import collections
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax

XLA_OPS_LINE = "XLA Ops"  # a line some tools derive from the stream lines: use it alone when present
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "send", "recv")
MATMUL_TARGETS = ("gemm", "matmul", "triton")
ATTENTION_TARGETS = ("fmha", "attention", "flash")


def capture(run_step: Callable[[], Any], steps: int, log_dir: str | Path) -> tuple[Path, float]:
    """Runs `run_step` (one step, returning something to block on) `steps` times under `jax.profiler.trace`;
    returns (the .xplane.pb written, wall seconds of the traced loop). The caller has warmed the step up."""
    log_dir = Path(log_dir)
    with jax.profiler.trace(str(log_dir)):
        t0 = time.perf_counter()
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("step", step_num=i):
                out = run_step()
        jax.block_until_ready(out)
        wall = time.perf_counter() - t0
    files = sorted(log_dir.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {log_dir}")
    return files[-1], wall


def profile_step(compiled: Any, inputs: tuple, steps: int, warmup: int, out_dir: Path, title: str) -> dict[str, Any]:
    """`compiled(state, batch, experts) -> (state, metrics)` warmed up, traced, tabled; the table is written to
    out_dir/profile_ops.{json,md} and returned without its rows beyond the first 10."""
    state, rest = inputs[0], inputs[1:]
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled(holder["state"], *rest)
        return holder["state"], metrics

    for _ in range(warmup):
        jax.block_until_ready(run_step())
    xplane, wall = capture(run_step, steps, out_dir / "profile_trace")
    module, categories = hlo_categories(compiled)
    table = op_table(xplane, module, categories, steps, wall)
    md = write(table, out_dir / "profile_ops.json", title)
    return {"trace": str(xplane.relative_to(out_dir)), "table_json": "profile_ops.json", "table_md": md.name,
            **{k: v for k, v in table.items() if k != "top_ops"}, "top_ops": table["top_ops"][:10]}


def hlo_categories(compiled: Any) -> tuple[str, dict[str, tuple[str, str]]]:
    """(module name, {instruction name: (opcode, category)}) of a `jax.stages.Compiled`, from its HLO modules."""
    modules = compiled.runtime_executable().hlo_modules()
    opcodes: dict[str, dict[str, Any]] = {}  # computation -> {instr name: instr}
    for module in modules:
        for comp in module.computations():
            opcodes[comp.name] = {ins.name: ins for ins in comp.instructions()}
    called_ops = {c: {_opcode(i) for i in instrs.values()} for c, instrs in opcodes.items()}
    table = {}
    for instrs in opcodes.values():
        for name, ins in instrs.items():
            table[name] = (_opcode(ins), _category(ins, called_ops))
    return modules[0].name, table


def _opcode(ins: Any) -> str:
    """'kFusion' -> 'fusion', 'kAllGatherStart' -> 'all-gather-start' (HLO text spelling)."""
    name = str(ins.opcode).rsplit(".", 1)[-1].removeprefix("k")
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _category(ins: Any, called_ops: dict[str, set[str]]) -> str:
    op = _opcode(ins)
    if any(op.startswith(c) for c in COLLECTIVES):
        return "collective"
    if op in ("dot", "convolution"):
        return "matmul"
    text = ins.to_string() if op in ("fusion", "custom-call", "async-start") else ""
    target = (re.search(r'custom_call_target="([^"]+)"', text) or [None, ""])[1].lower()
    calls = re.findall(r"calls=%?([\w.\-]+)", text)
    inner = set().union(*(called_ops.get(c, set()) for c in calls)) if calls else set()
    if any(t in target for t in ATTENTION_TARGETS) or "fmha" in text.lower():
        return "attention"
    if any(t in target for t in MATMUL_TARGETS) or inner & {"dot", "convolution"} or "__triton_gemm" in text:
        return "matmul"
    if any(c.startswith(k) for c in inner for k in COLLECTIVES):
        return "collective"
    if op == "fusion":
        if "reduce" in inner or "kind=kInput" in text:
            return "reduction fusion"
        return "elementwise fusion"
    if op in ("copy", "transpose", "copy-start", "copy-done", "dynamic-slice", "dynamic-update-slice", "slice",
              "concatenate", "pad", "gather", "scatter"):
        return "data movement"
    if op in ("while", "conditional", "call"):
        return "control flow"
    return op


def _exclusive(events: list[tuple[int, int, str]]) -> dict[int, int]:
    """{event index: exclusive ns} for (start_ns, end_ns, op) events of one timeline line: time in nested events of
    the same line is subtracted from the enclosing one."""
    order = sorted(range(len(events)), key=lambda i: (events[i][0], -events[i][1]))
    excl = {i: events[i][1] - events[i][0] for i in order}
    stack: list[int] = []
    for i in order:
        start, end, _ = events[i]
        while stack and events[stack[-1]][1] <= start:
            stack.pop()
        if stack and end <= events[stack[-1]][1]:
            excl[stack[-1]] -= end - start
        stack.append(i)
    return excl


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            total += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (0 if cur_e is None else cur_e - cur_s)


def _op_events(data: Any) -> tuple[list[tuple], list[str]]:
    """[(plane, line, start_ns, end_ns, hlo_module, hlo_op, device_ordinal)] of every op execution in the trace,
    and the plane:line names seen (for the error message when none matches)."""
    events, seen = [], []
    for plane in data.planes:
        lines = list(plane.lines)
        seen += [f"{plane.name}:{line.name}" for line in lines]
        derived = [line for line in lines if line.name == XLA_OPS_LINE]
        for line in derived or lines:
            for ev in line.events:
                stats = dict(ev.stats)
                op = stats.get("hlo_op") or (ev.name if derived else None)
                if op:
                    module = stats.get("hlo_module")
                    events.append((plane.name, line.name, int(ev.start_ns), int(ev.start_ns + ev.duration_ns),
                                   None if module is None else str(module), str(op), stats.get("device_ordinal")))
    return events, seen


def op_table(xplane: Any, module: str, categories: dict[str, tuple[str, str]], steps: int, wall_s: float,
             top: int = 30) -> dict[str, Any]:
    """The per-op table of `module`'s ops in the trace (an .xplane.pb path or a `jax.profiler.ProfileData`; see the
    module docstring for what each figure means)."""
    from jax.profiler import ProfileData

    data = xplane if isinstance(xplane, ProfileData) else ProfileData.from_file(str(xplane))
    events, seen_lines = _op_events(data)
    modules = collections.Counter(e[4] for e in events)
    if module not in modules and modules:  # another spelling of the name: the program traced is the busiest module
        module = max((m for m in modules if m is not None), key=modules.__getitem__, default=module)
    planes = {e[0] for e in events if e[4] in (module, None)}
    if any(p.startswith("/device:") for p in planes):  # accelerator kernels: host-side annotations are not device time
        planes = {p for p in planes if p.startswith("/device:")}
    per_device: dict[tuple, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    by_line: dict[tuple, list] = collections.defaultdict(list)
    for e in events:
        if e[0] in planes and e[4] in (module, None):
            by_line[e[:2]].append(e)
    for (plane, _), line_events in by_line.items():
        excl = _exclusive([(start, end, op) for _, _, start, end, _, op, _ in line_events])
        for i, (_, _, start, end, _, op, ordinal) in enumerate(line_events):
            per_device[(plane, ordinal)]["ops"].append((op, excl[i]))
            per_device[(plane, ordinal)]["spans"].append((start, end))
    if not per_device:
        raise RuntimeError(f"no event of module {module!r} in the trace; modules seen: {dict(modules)}; lines "
                           f"seen: {seen_lines[:40]}")
    n_dev = len(per_device)
    op_ns: dict[str, float] = collections.defaultdict(float)
    op_count: dict[str, int] = collections.defaultdict(int)
    busy_ns = 0.0
    for dev in per_device.values():
        for op, ns in dev["ops"]:
            op_ns[op] += ns / n_dev
            op_count[op] += 1
        busy_ns += _union_ns(dev["spans"]) / n_dev
    total_ns = sum(op_ns.values())
    rows = []
    for op, ns in sorted(op_ns.items(), key=lambda kv: -kv[1])[:top]:
        opcode, category = categories.get(op, ("?", "?"))
        rows.append({"op": op, "opcode": opcode, "category": category, "ms_per_step": ns / steps / 1e6,
                     "share": ns / total_ns, "count_per_step": op_count[op] / n_dev / steps})
    by_category: dict[str, float] = collections.defaultdict(float)
    for op, ns in op_ns.items():
        by_category[categories.get(op, ("?", "?"))[1]] += ns / total_ns
    return {
        "module": module, "steps": steps, "devices": n_dev, "distinct_ops": len(op_ns),
        "wall_s_per_step": wall_s / steps, "busy_s_per_step": busy_ns / steps / 1e9,
        "op_time_s_per_step": total_ns / steps / 1e9, "busy_over_wall": busy_ns / 1e9 / wall_s,
        "top_share": sum(r["share"] for r in rows),
        "by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])), "top_ops": rows,
    }


def markdown(table: dict[str, Any], title: str) -> str:
    """The table as a short markdown note."""
    t = table
    out = [f"### {title}", "",
           f"Per step: wall {t['wall_s_per_step'] * 1e3:.2f} ms, device busy {t['busy_s_per_step'] * 1e3:.2f} ms "
           f"({100 * t['busy_over_wall']:.1f}% of wall), summed op time {t['op_time_s_per_step'] * 1e3:.2f} ms; "
           f"{t['distinct_ops']} distinct ops, {t['steps']} steps traced, {t['devices']} device(s); module "
           f"`{t['module']}`.", "",
           "By category: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in t["by_category"].items()), "",
           "| # | op | category | ms/step | share | count/step |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(t["top_ops"], 1):
        out.append(f"| {i} | `{r['op']}` | {r['category']} | {r['ms_per_step']:.3f} | {100 * r['share']:.1f}% | "
                   f"{r['count_per_step']:g} |")
    out.append(f"\nTop {len(t['top_ops'])}: {100 * t['top_share']:.1f}% of the op time.")
    return "\n".join(out) + "\n"


def write(table: dict[str, Any], json_path: Path, title: str) -> Path:
    """`profile_ops.json` + `profile_ops.md` beside the device_check JSON; returns the markdown path."""
    json_path.write_text(json.dumps(table, indent=2) + "\n")
    md = json_path.with_suffix(".md")
    md.write_text(markdown(table, title))
    return md
