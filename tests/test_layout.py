"""The shape of the package as a reader meets it (STYLE.md C1): a reading floor, minirlhf/*.py, that teaches RLHF in
an afternoon (<= 2,400 lines by `wc -l`, no file over 400), and below it the machine room, minirlhf/infra/, that a
first reading skips. Imports flow one way: the math modules import nothing from the machine room, the entry points
only the names listed here, and nothing imports in a cycle."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOOR = ROOT / "minirlhf"
FLOOR_LINES, FILE_LINES = 2400, 400
MATH = {"model", "losses", "optim", "generate", "advantages", "rollout"}
ENTRY_POINTS = {"reward", "sft", "ppo"}
# What the entry points take from the machine room: growing this list is a decision, not a side effect.
ENTRY_IMPORTS = {
    "infra.config": {"TrainingConfig", "exit_on_bad_input", "require", "import_function"},
    "infra.run": {"start", "prepare", "autocast", "count_steps", "scheduled_lr", "optimizer_step", "due",
                  "checkpoint_or_stop", "save_final", "save_eval", "check_finite", "check_update", "Run"},
    "infra.parallel": {"all_reduce", "gather", "gradient_sync", "gathered_weights", "cleanup_distributed", "print0"},
    "infra.metrics": {"MetricsLogger", "LogWindow", "keep_records_up_to"},
    "infra.hf": {"load_pretrained"},
    "infra.lora": {"LoraArgs", "add_lora", "adapters_disabled"},
    "infra.packing": {"PaddingFreeRewardModel"},
    "infra.files": {"load_rows"},
    "infra.tokenizer": {"Tokenizer"},
    "infra.ppo_setup": {"load"},
    "infra.completions": {"Stopwatch", "add_text_scores", "log_sample_completions"},
}


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def modules() -> dict[str, Path]:
    """"model", "infra.run", ... -> file."""
    return {".".join(p.relative_to(FLOOR).with_suffix("").parts): p for p in FLOOR.rglob("*.py")
            if p.name != "__init__.py"}


def imports() -> dict[str, dict[str, set[str]]]:
    """Module -> {minirlhf module it imports -> the names it takes}, read with ast (imports inside functions count)."""
    known = set(modules())
    graph = {}
    for name, path in modules().items():
        found: dict[str, set[str]] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minirlhf"):
                package = node.module.removeprefix("minirlhf").removeprefix(".")
                for alias in node.names:
                    submodule = f"{package}.{alias.name}".lstrip(".")
                    if submodule in known:  # `from minirlhf.infra import toytask`
                        found.setdefault(submodule, set())
                    else:
                        found.setdefault(package, set()).add(alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("minirlhf."):
                        found.setdefault(alias.name.removeprefix("minirlhf."), set())
        found.pop(name, None)
        graph[name] = found
    return graph


def test_reading_floor_fits_an_afternoon():
    sizes = {p.name: lines(p) for p in FLOOR.glob("*.py")}
    assert sum(sizes.values()) <= FLOOR_LINES, sizes
    assert {name: n for name, n in sizes.items() if n > FILE_LINES} == {}


def test_math_modules_import_no_machine_room():
    graph = imports()
    for module in MATH:
        assert set(graph[module]) <= MATH, (module, set(graph[module]) - MATH)


def test_entry_points_take_only_the_listed_names():
    graph = imports()
    for module in ENTRY_POINTS:
        assert not set(graph[module]) & ENTRY_POINTS, module  # reward, sft and ppo never import each other
        for source, names in graph[module].items():
            if source.startswith("infra"):
                assert names <= ENTRY_IMPORTS.get(source, set()), (module, source, names - ENTRY_IMPORTS.get(source))


def test_machine_room_imports_no_entry_point():
    graph = imports()
    for module in (m for m in graph if m.startswith("infra.")):
        assert not set(graph[module]) & ENTRY_POINTS, module


def test_imports_form_no_cycle():
    graph = imports()
    done, visiting = set(), []

    def visit(module: str) -> None:
        assert module not in visiting, f"import cycle: {' -> '.join([*visiting, module])}"
        if module in done:
            return
        visiting.append(module)
        for dependency in sorted(graph.get(module, {})):
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_checks_can_fail(monkeypatch, tmp_path):
    """A cycle, a math module importing the machine room and an unlisted name are each refused."""
    this = sys.modules[__name__]
    cyclic = {"model": {"losses": set()}, "losses": {"infra.hf": set()}, "infra.hf": {"model": set()}}
    monkeypatch.setattr(this, "imports", lambda: cyclic)
    with pytest.raises(AssertionError, match="import cycle: infra.hf -> model -> losses -> infra.hf"):
        test_imports_form_no_cycle()
    math = {name: {} for name in MATH} | {"losses": {"infra.run": {"print0"}}}
    monkeypatch.setattr(this, "imports", lambda: math)
    with pytest.raises(AssertionError, match="losses"):
        test_math_modules_import_no_machine_room()
    entry = {"reward": {"infra.run": {"start", "StopSignal"}}, "sft": {}, "ppo": {}}
    monkeypatch.setattr(this, "imports", lambda: entry)
    with pytest.raises(AssertionError, match="StopSignal"):
        test_entry_points_take_only_the_listed_names()
