"""Op counts and collective overlap of a compiled (scheduled) HLO text, as written by `gpfm-plan --hlo OUT`.

Why: without a GPU the only evidence that a compiler setting (e.g. the latency-hiding scheduler) or a model change
(concatenated crops) helps is in the compiled program: how many kernels it launches (fusions, GEMM / cuDNN custom
calls) and how much compute XLA scheduled between each asynchronous collective's start and done (the compute
that can hide it). Loop bodies are counted once per appearance, not times their trip count.

    python tools/hlo_schedule.py OUT.hlo [OTHER.hlo ...]
"""

from __future__ import annotations

import collections
import re
import sys

_NAME = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")  # the first " opcode(" after the (possibly tuple) result type
_CUSTOM = re.compile(r'custom_call_target="([^"]+)"')
_START = ("all-gather-start", "all-reduce-start", "reduce-scatter-start", "collective-permute-start", "async-start")
_DONE = {"all-gather-done", "all-reduce-done", "reduce-scatter-done", "collective-permute-done", "async-done"}
_COMPUTE = ("fusion", "custom-call")


def analyse(text: str) -> dict:
    ops: collections.Counter = collections.Counter()
    customs: collections.Counter = collections.Counter()
    overlaps: list[int] = []
    open_starts: dict[str, int] = {}
    compute_seen = 0
    for line in text.splitlines():
        if line.startswith(("ENTRY", "%")) and line.rstrip().endswith("{"):
            open_starts, compute_seen = {}, 0  # a new computation: schedules are per computation
            continue
        name = _NAME.match(line)
        m = _OPCODE.search(line, name.end() - 1) if name else None
        if not m:
            continue
        op = m.group(1)
        ops[op] += 1
        if op == "custom-call":
            c = _CUSTOM.search(line)
            customs[c.group(1) if c else "?"] += 1
        if op in _COMPUTE:
            compute_seen += 1
        if op in _START:
            open_starts[name.group(1)] = compute_seen
        elif op in _DONE:
            operand = re.match(r"\(%([\w.\-]+)", line[m.end() - 1:])
            if operand and operand.group(1) in open_starts:
                overlaps.append(compute_seen - open_starts.pop(operand.group(1)))
    hidden = sum(1 for o in overlaps if o > 0)
    return dict(fusions=ops["fusion"], custom_calls=dict(customs.most_common(6)), async_collectives=len(overlaps),
                with_compute_between=hidden, mean_compute_between=(sum(overlaps) / len(overlaps) if overlaps else 0.0),
                collectives_sync={k: ops[k] for k in ("all-gather", "reduce-scatter", "all-reduce") if ops[k]},
                unmatched_starts=sum(ops[k] for k in _START) - len(overlaps))


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(path, analyse(open(path).read()))
