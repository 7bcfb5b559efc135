"""The shape of the package as a reader meets it: imports only go downward (no cycle; model.py knows nothing of
Hugging Face files), every file stays readable in one sitting, and the README's file table is current."""

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minirlhf"
MAX_LINES = 450


def imports() -> dict[str, set[str]]:
    """Module name -> the minirlhf modules it imports, read with ast (any depth: imports inside functions count)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "minirlhf":
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minirlhf."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("minirlhf.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_imports_form_no_cycle():
    graph = imports()
    assert graph["model"] <= {"losses", "packing"}, graph["model"]  # the model reads no files: hf.py loads and saves it
    assert not graph["ppo"] & {"toytask", "reward", "sft"} and not graph["reward"] & {"ppo", "sft"}
    done, visiting = set(), []

    def visit(module: str) -> None:
        assert module not in visiting, f"import cycle: {' -> '.join([*visiting, module])}"
        if module in done:
            return
        visiting.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_cycle_check_finds_a_cycle(monkeypatch):
    """The check above can fail: a graph with a cycle is refused."""
    cyclic = {"model": {"losses"}, "losses": {"hf"}, "hf": {"model"}, "ppo": set(), "reward": set()}
    monkeypatch.setattr(sys.modules[__name__], "imports", lambda: cyclic)
    with pytest.raises(AssertionError, match="import cycle: hf -> model -> losses -> hf"):
        test_imports_form_no_cycle()


def test_files_stay_short():
    lengths = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_readme_line_counts_are_current():
    """Each row `| minirlhf/x.py | N | ... |` of the README's file table is within 10% of the file's length, and every
    module has a row."""
    rows = dict(re.findall(r"^\| `(minirlhf/\w+\.py)` \| (\d+) \|", (ROOT / "README.md").read_text(), re.M))
    files = {f"minirlhf/{path.name}" for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}
    assert set(rows) == files
    for name, stated in rows.items():
        actual = len((ROOT / name).read_text().splitlines())
        assert abs(int(stated) - actual) <= 0.1 * actual, (name, stated, actual)
