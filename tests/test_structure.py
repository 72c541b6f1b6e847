"""The package's structure: no import circle, the compiler above the transforms, torch internals in one file."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hyperfunc"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict:
    """``{module: set of hyperfunc modules it imports}``, every import counted (TYPE_CHECKING and
    function-level ones too)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                # `from pkg import sub` imports the module pkg.sub; `from pkg import name` imports pkg
                candidates = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c != name}
        graph[name] = found
    return graph


def test_no_import_circle():
    graph = _imports()
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_transforms_never_import_the_compiler():
    for name, targets in _imports().items():
        if name.startswith("hyperfunc.transforms"):
            assert not any(t.startswith("hyperfunc.compile") for t in targets), (name, targets)


PRIVATE = re.compile(r"\btorch\._|\b_pytree\b|\b_functorch\b|torch\.fx\.experimental|_TorchCompile")


def test_private_torch_symbols_only_in_the_torch_internals_module():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_torch.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if PRIVATE.search(code) and not code.lstrip().startswith((">>>", "...")):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "private torch symbols outside hyperfunc/_torch.py:\n" + "\n".join(offenders)
