"""The import layering of gopo_jax (ARCHITECTURE.md: data flows one way): no import cycles and no arrow from a
lower layer up to a higher one.

Modules are parsed with `ast`, never imported, and every import counts: module level, inside functions (a deferred
import is still a dependency, only a later one) and a "gopo_jax.pkg.module:function" registry string. The graph,
cycle and layer functions here are also what `python -m benchmarks.import_graph` prints.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib

PACKAGE = "gopo_jax"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The layer of each top-level part of gopo_jax, low to high; a module may import from its own part, from any part
# of a lower level, and from a part of its own level only where SAME_LEVEL lists the pair.
LAYERS = {
    # -1 - the one command-line convention of every entry point (absl flags, one-line errors): imports nothing of
    # gopo_jax, so any module with a `cli()` may use it.
    "command_line": -1,
    "peer_watch": -1,  # ends a process whose jax.distributed peer is gone; imports nothing of gopo_jax
    # 0 - foundations that know nothing of dialogue: the decoder and its I/O, the sampler, device meshes, and the
    # metrics, which are pure functions of arrays and host records (a reward must not depend on who computes it).
    "models": 0,
    "parallel": 0,
    "distributed": 0,  # a driver joins a multi-process job (jax.distributed) and starts the peer watch
    "sampling": 0,
    "metrics": 0,
    "endpoint": 0,  # the openai-SDK client of chat endpoints: the G-Eval judge and the prompted baseline share it
    # 1 - the dialogue vocabulary every world and every learner shares: trajectory layout, the SOP automaton and its
    # masked strategy distribution, rollout drivers and scoring (they take an environment as an argument, so the
    # environment interface belongs here or lower, never in envs).
    "dialogue": 1,
    # 2 - the two users of dialogue, independent of each other: environments never import algorithms (ARCHITECTURE.md)
    # and algorithms are pure losses on trajectories, whichever world produced them.
    "envs": 2,
    "algorithms": 2,
    # 3 - the trainer: joins a world, an algorithm and the models into runs, checkpoints and metrics.
    "train": 3,
    # 4 - the edges that consume trained runs: external-model clients, report tables and figures, the HTTP server.
    "clients": 4,
    "report": 4,
    "serve": 4,
    "export": 4,  # a run's agents as Hugging Face folders
    "chat": 4,  # a terminal dialogue with a run's agents; loads the run as the export does
    "inspect_run": 4,  # what a run directory holds: config, checkpoints and their fingerprints, metrics
    # 5 - the one entry point that turns a config into a run: the trainer, or for `method=prompted` the clients'
    # evaluation of an external chat model; experiments call it, nothing in gopo_jax does.
    "launch": 5,
    "plan": 5,  # the memory planner: builds a run's abstract state and phases (train) to predict its bytes per device
}
# Same-level arrows that are part of the design, (from, to); the reverse of each stays forbidden, so no cycle forms.
SAME_LEVEL = {
    ("metrics", "models"),
    ("metrics", "endpoint"),  # the G-Eval judge scores through an OpenAI-compatible endpoint  # the G-Eval judge loads its Hugging Face weights through models.hf_io
    ("sampling", "models"),  # the sampler drives the decoder's prefill and KV-cache decode
    ("chat", "export"),  # the chat restores a run with the export's `load_run`
    ("serve", "export"),  # the server restores a run with the export's `load_run` ...
    ("serve", "chat"),  # ... and realises replies and moves the SOP stage as the chat does
}


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str  # the importing file, relative to the root
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} -> {self.target}"


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py under root/gopo_jax (a package is its __init__.py)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The longest existing module that `name` starts with (gopo_jax.a.b.attr -> gopo_jax.a.b)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """(dotted name, line) for every import in the tree; `from a import b` gives a.b (b may be a module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            for alias in node.names:
                yield f"{prefix}.{alias.name}", node.lineno
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith(PACKAGE + ".") and node.value.split(":")[0].replace(".", "").isidentifier()):
            yield node.value.split(":")[0], node.lineno


def import_edges(root: pathlib.Path) -> list[Edge]:
    """Every import of one gopo_jax module by another, with where it is written; self-imports are dropped."""
    modules = module_files(root)
    edges = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line in _imported_names(tree, module, path.name == "__init__.py"):
            target = _resolve(name, modules) if name.startswith(PACKAGE) else None
            if target is not None and target != module:
                edges.add(Edge(module, target, str(path.relative_to(root)), line))
    return sorted(edges, key=lambda e: (e.source, e.target, e.line))


def graph_of(edges: list[Edge], modules) -> dict[str, set[str]]:
    graph = {m: set() for m in modules}
    for e in edges:
        graph[e.source].add(e.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def part_of(module: str) -> str | None:
    """gopo_jax.train.loop -> "train", gopo_jax.serve -> "serve"; the top package itself has no part."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(edges: list[Edge]) -> list[tuple[Edge, str]]:
    """Each edge that breaks LAYERS / SAME_LEVEL, with the reason."""
    out = []
    for e in edges:
        src, dst = part_of(e.source), part_of(e.target)
        if src is None or dst is None or src == dst:
            continue
        if src not in LAYERS or dst not in LAYERS:
            unknown = src if src not in LAYERS else dst
            out.append((e, f"'{unknown}' is not in the layer table of tests/test_layering.py"))
        elif LAYERS[src] < LAYERS[dst]:
            out.append((e, f"upward: {src} (level {LAYERS[src]}) -> {dst} (level {LAYERS[dst]})"))
        elif LAYERS[src] == LAYERS[dst] and (src, dst) not in SAME_LEVEL:
            out.append((e, f"same level {LAYERS[src]}: {src} -> {dst} is not in SAME_LEVEL"))
    return out


def test_the_parser_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "sampling.py").write_text("")
    (pkg / "train" / "loop.py").write_text(
        "from . import step\n"
        "def run():\n    from gopo_jax.serve import handler\n"
        "REGISTRY = {'x': 'gopo_jax.sampling:decode'}\n")
    (pkg / "train" / "step.py").write_text("import gopo_jax.train.loop\n")
    (pkg / "serve.py").write_text("from gopo_jax.train.loop import run\n")
    edges = import_edges(tmp_path)
    assert {(e.source, e.target, e.line) for e in edges} == {
        ("gopo_jax.train.loop", "gopo_jax.train.step", 1),
        ("gopo_jax.train.loop", "gopo_jax.serve", 3),
        ("gopo_jax.train.loop", "gopo_jax.sampling", 4),
        ("gopo_jax.train.step", "gopo_jax.train.loop", 1),
        ("gopo_jax.serve", "gopo_jax.train.loop", 1),
    }
    graph = graph_of(edges, module_files(tmp_path))
    assert cycles(graph) == [["gopo_jax.serve", "gopo_jax.train.loop", "gopo_jax.train.step"]]
    assert [(str(e), why) for e, why in layer_violations(edges)] == [
        ("gopo_jax/train/loop.py:3: gopo_jax.train.loop -> gopo_jax.serve", "upward: train (level 3) -> serve (level 4)")]


def test_the_layer_table_names_every_part_of_gopo_jax():
    parts = {part_of(m) for m in module_files(REPO_ROOT)} - {None}
    assert parts == set(LAYERS), f"add {sorted(parts - set(LAYERS))} / drop {sorted(set(LAYERS) - parts)} in LAYERS"


def test_no_import_cycles():
    modules = module_files(REPO_ROOT)
    edges = import_edges(REPO_ROOT)
    found = cycles(graph_of(edges, modules))
    lines = []
    for component in found:
        members = set(component)
        lines.append("cycle: " + ", ".join(component))
        lines += [f"    {e}" for e in edges if e.source in members and e.target in members]
    assert not found, "import cycles in gopo_jax:\n" + "\n".join(lines)


def test_no_upward_or_sideways_imports():
    bad = layer_violations(import_edges(REPO_ROOT))
    assert not bad, (f"{len(bad)} imports break the layer table (tests/test_layering.py LAYERS):\n"
                     + "\n".join(f"    {e}  [{why}]" for e, why in bad))
