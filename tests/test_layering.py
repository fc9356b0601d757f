"""The house rules, checked from the source: data flows one way at run time (parallel ->
comm -> compress), there are no import circles, and the training step never branches on
the strategy."""
import ast
import inspect
import textwrap
from pathlib import Path

import commtrain
from commtrain.train import Trainer

ROOT = Path(commtrain.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the commtrain modules ``path`` imports (all, or at module level only)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("commtrain")}
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def test_comm_never_imports_parallel():
    offenders = {name: sorted(i for i in _imports(path, top_level_only=False) if i.startswith("commtrain.parallel"))
                 for name, path in _modules().items() if name.startswith("commtrain.comm")}
    assert not {k: v for k, v in offenders.items() if v}


def test_compress_imports_neither_comm_nor_parallel():
    for name, path in _modules().items():
        if name.startswith("commtrain.compress"):
            bad = [i for i in _imports(path, top_level_only=False)
                   if i.startswith(("commtrain.comm", "commtrain.parallel", "commtrain.train"))]
            assert not bad, (name, bad)


def test_no_import_circles_at_module_level():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(path, top_level_only=True):
            while imp and imp not in mods:  # "pkg.mod.Name" -> "pkg.mod"
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):  # a package's own __init__ is its parent
                deps.add(imp)
        graph[name] = deps
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n, stack):
        state[n] = 1
        for d in graph.get(n, ()):
            if d.startswith(n + "."):
                continue  # a package importing its own submodules (its __init__) is not a circle
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d])
                return True
            if state.get(d) is None and visit(d, stack + [d]):
                return True
        state[n] = 2
        return False

    for n in graph:
        if state.get(n) is None and visit(n, [n]):
            break
    assert not cycle, " -> ".join(cycle)


def test_train_step_has_no_branch_on_strategy():
    src = textwrap.dedent(inspect.getsource(Trainer.train_step))
    tree = ast.parse(src)
    branches = [n for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp, ast.Match))]
    assert not branches, [ast.unparse(b.test) for b in branches if hasattr(b, "test")]
    assert "self.sync.step(" in src and "self.forward_backward(" in src
