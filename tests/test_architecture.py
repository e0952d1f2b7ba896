"""The import direction of docs/architecture.md: stages import only those before them, never an entry point.

Read from the source (every ``import`` statement, also those inside functions), so a lazy import that
reaches up is caught as well as a module-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mistral_fast"

# Each module's layer; a module may import modules of lower layers only (its own package's siblings too,
# as long as they form no cycle). Entry points come last: nothing below them imports them.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "constants", "policies", "pause", "quiet", "example", "terminal"),
    ("atomic", "resources", "rewards"),
    ("families",),
    ("config",),
    ("distributed",),
    ("tekken",),
    ("tokenizer",),
    ("data",),
    ("dataset", "preference"),
    ("modeling",),
    ("tracking",),
    ("train", "evaluate", "manifest"),
    ("grpo",),
    ("train_preference",),
    ("train_grpo",),
    ("rundir",),
    ("export", "memory"),
    ("pipeline",),
    ("notebook",),
    ("runner",),
    ("cli", "__init__", "__main__"),
]
ENTRY_POINTS = {"pipeline", "notebook", "runner", "cli", "__init__", "__main__"}


def _top(module: str) -> str:
    """The layer name of a module: its first component below mistral_fast (``modeling.loading`` → modeling)."""
    return module.split(".")[0]


def _module_of(base: str, name: str) -> str:
    """``from mistral_fast.<base> import <name>``: the submodule <name> if there is one, else <base>."""
    dotted = f"{base}.{name}" if base else name
    folder = PACKAGE.joinpath(*dotted.split("."))
    return dotted if folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file() else base


def _imports(path: Path, *, typing: bool = False) -> set[str]:
    """Modules of mistral_fast that a file imports, as dotted names relative to the package.

    ``typing``: count ``if TYPE_CHECKING:`` imports too (they never run, but still tie the modules together).
    """
    found: set[str] = set()
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {  # `if TYPE_CHECKING:` imports never run: annotations may name any module
        id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only and not typing:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base == "mistral_fast" or base.startswith("mistral_fast."):
                found |= {_module_of(base.removeprefix("mistral_fast").lstrip("."), a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("mistral_fast.") for a in node.names if a.name.startswith("mistral_fast.")}
    return found


def _graph(*, typing: bool = False) -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__") or "__init__"
        graph[name] = _imports(path, typing=typing)
    return graph


def _layer(module: str) -> int:
    top = _top(module)
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"mistral_fast.{module} has no layer in LAYERS: add it (and to docs/architecture.md)")


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_point_down(module: str) -> None:
    upward = sorted(
        target for target in _graph()[module] if _top(target) != _top(module) and _layer(target) >= _layer(module)
    )
    assert not upward, f"mistral_fast.{module} imports {upward}, which are not below it"


def test_no_stage_imports_an_entry_point() -> None:
    offenders = {
        module: sorted(t for t in targets if _top(t) in ENTRY_POINTS)
        for module, targets in _graph(typing=True).items()
        if _top(module) not in ENTRY_POINTS
    }
    assert not {m: t for m, t in offenders.items() if t}


def test_no_import_cycle() -> None:
    """Also through ``if TYPE_CHECKING:`` imports: a type that two layers need belongs in the lower one (a
    cycle there still ties the modules together, and turns into a real cycle the day the import runs)."""
    graph = _graph(typing=True)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            target = target if target in graph else _top(target)
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path, node, target]))
            if target in graph and state.get(target) is None:
                visit(target, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
