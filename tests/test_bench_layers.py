"""Import structure of gpfm_jax.evaluation and gpfm_jax.encoder_bench, read from the source (every import, also the
ones inside functions): no module imports itself back through others (the mil_models <-> transmil cycle is gone),
and each package imports only layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gpfm_jax"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """gpfm_jax modules imported anywhere in the file (`from gpfm_jax.x import y` counts gpfm_jax.x.y when that is a
    module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gpfm_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpfm_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (PKG.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                out.add(sub if is_module else node.module)
    return out


def _graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = [p for pkg in packages for p in (PKG / pkg).rglob("*.py")]
    return {_module(p): _imports(p) for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph or nxt.endswith("__main__"):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (found := visit(nxt, stack + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles_in_evaluation_and_bench():
    graph = _graph(("evaluation", "encoder_bench"))
    # a package __init__ importing its own modules is the package's API, not a cycle through it
    graph = {m: {i for i in deps if not (m.count(".") == 1 and i.startswith(m + "."))} for m, deps in graph.items()}
    assert _cycle(graph) is None, _cycle(graph)
    assert "gpfm_jax.evaluation.mil_models" not in graph["gpfm_jax.evaluation.transmil"]
    assert "gpfm_jax.evaluation.mil_layers" in graph["gpfm_jax.evaluation.transmil"]


def test_layers():
    upward = {"evaluation": ("gpfm_jax.encoder_bench", "gpfm_jax.plan", "gpfm_jax.train", "gpfm_jax.step"),
              "encoder_bench": ("gpfm_jax.plan", "gpfm_jax.train", "gpfm_jax.step")}
    for pkg, forbidden in upward.items():
        for module, deps in _graph((pkg,)).items():
            bad = sorted(d for d in deps if d.startswith(forbidden))
            assert not bad, f"{module} imports {bad} (a layer above it)"
