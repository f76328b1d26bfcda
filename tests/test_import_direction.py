"""Imports point one way (docs/ARCHITECTURE.md): cli/bench -> api/modes -> loading/lora/training/inference/export
-> patch -> kernels, with arch, errors, state and utils as leaves. Every import counts, lazy ones inside functions
too: a lazy import still makes the lower layer depend on the higher one. A new top-level module or package must
be given its layer here."""
import ast
from pathlib import Path

import fastlm

ROOT = Path(fastlm.__file__).resolve().parent
LAYER = {
    "errors": 0, "state": 0, "utils": 0, "arch": 0, "version": 0,
    "kernels": 1,
    "patch": 2,
    "loading": 3, "lora": 3, "training": 3, "inference": 3, "export": 3, "chat_templates": 3, "save_guard": 3,
    "modes": 4, "api": 4,
    "cli": 5, "bench": 5, "jobs": 5,
    "__init__": 6, "__main__": 6,
}
# arch is data: it imports nothing else of fastlm at all
SELF_CONTAINED = {"arch"}
KNOWN_BACK_EDGES: set[tuple[str, str]] = set()  # none left; keep it that way


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(line, imported module) for every fastlm import in the file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fastlm":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastlm":
                continue
            if node.module is None or target == "fastlm":  # "from . import x": x is a module or a name
                for alias in node.names:
                    sub = ROOT.parent.joinpath(*target.split("."), alias.name)
                    is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                    yield node.lineno, f"{target}.{alias.name}" if is_module else target
            else:
                yield node.lineno, target


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _edges():
    for path in sorted(ROOT.rglob("*.py")):
        src = _module_name(path)
        for line, dst in _imports(path):
            if (src, dst) in KNOWN_BACK_EDGES:
                continue
            yield path.relative_to(ROOT.parent), line, src, dst


def test_every_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert sorted(tops - set(LAYER)) == []


def test_imports_point_one_way():
    bad = []
    for where, line, src, dst in _edges():
        s, d = _top(src), _top(dst)
        if s == d:
            if s in SELF_CONTAINED or dst == src:
                continue
            continue
        if s in SELF_CONTAINED:
            bad.append(f"{where}:{line} {src} -> {dst} (arch imports nothing else of fastlm)")
        elif LAYER[d] > LAYER[s]:
            bad.append(f"{where}:{line} {src} (layer {LAYER[s]}) -> {dst} (layer {LAYER[d]})")
    assert bad == [], "imports against the direction:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for _, _, src, dst in _edges():
        graph.setdefault(src, set()).add(dst)
    # a package's __init__ re-exporting its own submodules is not a cycle of the design; skip those edges
    def deps(m):
        return {d for d in graph.get(m, ()) if not (d.startswith(m + ".") or m.startswith(d + ".") and
                                                   d.count(".") < m.count("."))}

    cycles = []
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in deps(m):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]) if d in stack else f"{m} -> {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)
