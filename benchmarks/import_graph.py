"""The import graph of gopo_jax as text: every module with its line count and the gopo_jax modules it imports, then
the totals, the import cycles and the arrows that break the layer table of tests/test_layering.py (whose parser,
cycle finder and table this reuses). Point --root at another checkout to compare before and after a refactor.

    python -m benchmarks.import_graph [--root DIR]
"""
from __future__ import annotations

import pathlib

from absl import flags

from gopo_jax import command_line
from tests.test_layering import LAYERS, REPO_ROOT, cycles, graph_of, import_edges, layer_violations, module_files


def report(root: pathlib.Path) -> str:
    modules = module_files(root)
    edges = import_edges(root)
    graph = graph_of(edges, modules)
    counts = {m: len(path.read_text().splitlines()) for m, path in modules.items()}
    width = max(map(len, modules))
    out = [f"# gopo_jax import graph of {root.resolve()}", ""]
    for m in sorted(modules):
        imports = ", ".join(t.removeprefix("gopo_jax.") for t in sorted(graph[m])) or "-"
        out.append(f"{m:<{width}} {counts[m]:>5}  {imports}")
    by_part = {}
    for m, n in counts.items():
        part = m.split(".")[1] if "." in m else "(gopo_jax/__init__)"
        by_part[part] = by_part.get(part, 0) + n
    out += ["", f"modules: {len(modules)}   lines: {sum(counts.values())}   import edges: {len(edges)}", "",
            "lines by part (level):"]
    out += [f"    {part:<20} {LAYERS.get(part, '-')!s:>2} {n:>6}" for part, n in sorted(by_part.items())]
    found = cycles(graph)
    out += ["", f"cycles: {len(found)}"]
    for component in found:
        members = set(component)
        out.append("    " + ", ".join(component))
        out += [f"        {e}" for e in edges if e.source in members and e.target in members]
    bad = layer_violations(edges)
    out += ["", f"layer violations: {len(bad)}"]
    out += [f"    {e}  [{why}]" for e, why in bad]
    return "\n".join(out)


def define_flags() -> None:
    flags.DEFINE_string("root", str(REPO_ROOT), "checkout holding gopo_jax/")


def main(argv) -> None:
    del argv
    print(report(pathlib.Path(flags.FLAGS.root)))


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
