"""The house's floors: the import graph of sid_fast and bench, read from the source (every import, at module level or
inside a function), has no cycle, and no module imports one of a higher layer. The layers are declared here, once
(docs/architecture.md shows them); a module that matches no layer fails the test, so a new module must be placed.

Also: training and metrics import no teacher family's own module (only the registry, sid_fast.families, and its
protocol), nor the text-to-image package; function-local imports carry the reason in a comment or import an optional
dependency (a third-party package), so that the count of local imports between sid_fast's own modules stays known."""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import modules of its own layer or a lower one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("sid_fast.kernels", "sid_fast.kernels.*")),
    ("basics", ("sid_fast", "sid_fast.files", "sid_fast.flags", "sid_fast.progress", "sid_fast.hf", "sid_fast.dist",
                "sid_fast.losses", "sid_fast.casts", "sid_fast.storage", "sid_fast.guard", "sid_fast.data",
                "sid_fast.data.prompts", "sid_fast.fewstep")),
    ("ops", ("sid_fast.ops",)),
    ("networks", ("sid_fast.networks", "sid_fast.networks.*")),
    ("files and data", ("sid_fast.checkpoints", "sid_fast.sampling", "sid_fast.ema", "sid_fast.augment",
                        "sid_fast.perf", "sid_fast.data.*", "sid_fast.latents")),
    ("services", ("sid_fast.metrics", "sid_fast.metrics.*", "sid_fast.t2i", "sid_fast.t2i.sd",
                  "sid_fast.t2i.configs", "sid_fast.t2i.pickles", "sid_fast.t2i.tokens", "sid_fast.t2i.flow",
                  "sid_fast.t2i.flux", "sid_fast.t2i.sd3", "sid_fast.t2i.sana")),
    ("text-to-image tools", ("sid_fast.t2i.export", "sid_fast.t2i.digits", "sid_fast.t2i.digits_flow",
                             "sid_fast.t2i.pairs")),
    ("generator folders", ("sid_fast.hub",)),
    ("families", ("sid_fast.families.*",)),
    ("family registry", ("sid_fast.families",)),
    ("training", ("sid_fast.training", "sid_fast.training.*")),
    ("commands", ("sid_fast.sample", "sid_fast.fid", "sid_fast.export", "sid_fast.t2i.sample",
                  "sid_fast.t2i.evaluate")),
    ("bench", ("bench", "bench.common")),
    ("bench measurements", ("bench.*",)),
]  # fmt: skip
# Within a layer the order of these matters too: a run is assembled above the trainer it builds.
ABOVE = {"sid_fast.training.run": ("sid_fast.training.*",)}
# Who may not import whom, beyond the layers: the trainer and the metrics know families only through the registry.
FORBIDDEN = {
    "sid_fast.training.*": ("sid_fast.t2i", "sid_fast.t2i.*", "sid_fast.families.edm", "sid_fast.families.edm2",
                            "sid_fast.families.sd"),
    "sid_fast.metrics*": ("sid_fast.t2i", "sid_fast.t2i.*", "sid_fast.families*", "sid_fast.training*"),
}  # fmt: skip


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted([*(ROOT / "sid_fast").rglob("*.py"), *(ROOT / "bench").glob("*.py")]):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, bool, int]]:
    """(imported module of the project, inside a function?, line) for every import statement of `path`."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import sub` imports the submodule sub (and runs pkg's __init__, which is pkg's own business)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if subs and len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a package's module: the nearest known module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.append((t, id(node) in local_nodes, node.lineno))
    return found


def layer(name: str) -> int:
    """The layer that names the module exactly, else the first whose wildcard matches it."""
    for i, (_, pats) in enumerate(LAYERS):
        if name in pats:
            return i
    hits = [i for i, (_, pats) in enumerate(LAYERS) if any(fnmatch.fnmatchcase(name, p) for p in pats)]
    assert hits, f"{name}: no layer declared for this module (tests/test_import_graph.py LAYERS)"
    return hits[0]


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return mods, {n: imports(n, p, mods) for n, p in mods.items()}


def test_every_module_has_a_layer(graph):
    mods, _ = graph
    for name in mods:
        layer(name)


def violations(mods, edges) -> list[str]:
    """Every import that goes up a floor, assembles its own assembler, or is forbidden."""
    bad = []
    for a, targets in edges.items():
        where = mods[a].relative_to(ROOT) if a in mods else a
        for b, _, line in targets:
            if layer(b) > layer(a):
                bad.append(f"{where}:{line} {a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})")
            for upper, lowers in ABOVE.items():
                if b == upper and a != upper and any(fnmatch.fnmatchcase(a, p) for p in lowers):
                    bad.append(f"{where}:{line} {a} imports {b}, which assembles it")
            for who, banned in FORBIDDEN.items():
                if fnmatch.fnmatchcase(a, who) and any(fnmatch.fnmatchcase(b, p) for p in banned):
                    bad.append(f"{where}:{line} {a} imports {b} (forbidden: {who} -> {banned})")
    return bad


def test_nothing_imports_up_a_floor(graph):
    mods, edges = graph
    bad = violations(mods, edges)
    assert not bad, "\n".join(bad)


def find_cycle(edges: dict[str, list]) -> list[str] | None:
    """One cycle of the graph (a list of modules, first = last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m, _, _ in edges.get(n, ()):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_cycles(graph):
    _, edges = graph
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_instruments_see_planted_faults(graph):
    """Each rule reports a planted breach (the zeros above are not blind ones): a circle checkpoints <-> hub,
    ops importing a network module, the trainer importing the run that builds it, the trainer importing the Stable
    Diffusion family's module, metrics importing the text-to-image package."""
    mods, edges = graph
    planted = {k: list(v) for k, v in edges.items()}
    for a, b in [("sid_fast.checkpoints", "sid_fast.hub"), ("sid_fast.ops", "sid_fast.networks.layers"),
                 ("sid_fast.training.sid", "sid_fast.training.run"), ("sid_fast.training.sid", "sid_fast.families.sd"),
                 ("sid_fast.metrics.clip_score", "sid_fast.t2i.sd")]:  # fmt: skip
        planted[a] = [*planted[a], (b, False, 1)]
    assert find_cycle(planted) is not None  # checkpoints -> hub -> checkpoints
    found = "\n".join(violations(mods, planted))
    for a, b in [("sid_fast.checkpoints", "sid_fast.hub"), ("sid_fast.ops", "sid_fast.networks.layers"),
                 ("sid_fast.training.sid", "sid_fast.training.run"), ("sid_fast.training.sid", "sid_fast.families.sd"),
                 ("sid_fast.metrics.clip_score", "sid_fast.t2i.sd")]:  # fmt: skip
        assert f"{a} " in found and f" {b}" in found, (a, b)


# The packages every install has (pyproject's dependencies): importing one of them inside a function needs a reason.
REQUIRED = {"torch", "triton", "numpy", "scipy", "click", "PIL", "tqdm", "safetensors", "pynvml", "matplotlib",
            "filelock"}  # fmt: skip


def local_imports_without_reason(path: Path) -> list[str]:
    """Imports inside functions of sid_fast's own modules, the standard library or a required dependency that carry
    no comment on their line (an optional dependency, e.g. diffusers, is imported where it is needed)."""
    text = path.read_text()
    lines, found = text.splitlines(), []
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for f in ast.walk(ast.parse(text)):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    top = "sid_fast" if isinstance(node, ast.ImportFrom) and node.level else (mod or "").split(".")[0]
                    own = top in ("sid_fast", "bench") or top in REQUIRED or top in sys.stdlib_module_names
                    if own and "#" not in lines[node.lineno - 1]:
                        found.append(f"{shown}:{node.lineno} {lines[node.lineno - 1].strip()}")
    return sorted(set(found))


def test_function_local_imports_say_why(graph, tmp_path):
    """A function-local import of sid_fast's own modules, the standard library or a required dependency says why in a
    comment (start-up time, a machine without the feature); a new unexplained one fails here (planted: caught)."""
    mods, _ = graph
    unexplained = [
        x for name, path in mods.items() if name.startswith("sid_fast") for x in local_imports_without_reason(path)
    ]
    assert not unexplained, "\n".join(unexplained)
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    import json\n\n    from sid_fast import ops  # ok: said\n    import diffusers\n")
    assert local_imports_without_reason(planted) == ["planted.py:2 import json"]
