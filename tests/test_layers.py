"""The floors of the house (docs/ARCHITECTURE.md), checked on every import statement, including the ones
inside functions: the library never imports a stage, a benchmark or the CLI; a stage never imports another
stage; only nanochat_cli/sky_backend.py imports SkyPilot."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "nanochat_core"
CLI = ROOT / "nanochat_cli"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; `from x import y` also counts x.y, which may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def floor(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    if rel[0] == "nanochat_cli":
        return "cli"
    if rel[1] in ("stages", "bench"):
        return rel[1]
    return "library"   # nanochat_core/*.py and nanochat_core/tasks/


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["nanochat_core", "stages"] and len(parts) > 2:
        return parts[2]
    return None


def python_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.py") if "data" not in p.relative_to(d).parts[:1])


def test_floors_are_respected():
    problems = []
    for path in python_files(CORE, CLI):
        where, mods = floor(path), imported_modules(path)
        rel = path.relative_to(ROOT)
        for m in sorted(mods):
            top = m.split(".")[0]
            if where != "cli" and (top in ("nanochat_cli", "typer", "sky")):
                problems.append(f"{rel} (core) imports {m}")
            if where == "library" and (m.startswith("nanochat_core.stages") or m.startswith("nanochat_core.bench")):
                problems.append(f"{rel} (library) imports {m}")
            if where in ("stages", "bench") and stage_of(m) and stage_of(m) != path.stem:
                problems.append(f"{rel} ({where}) imports the stage {m}")
            if where == "cli" and top == "sky" and path.name != "sky_backend.py":
                problems.append(f"{rel} imports SkyPilot; only sky_backend.py may")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source, bad", [
    ("from nanochat_core.stages.chat_sft import x\n", "stages"),
    ("import sky\n", "sky"),
])
def test_the_checker_sees_violations(tmp_path, source, bad):
    """The check above must be able to fail: the same parser finds a planted import."""
    f = tmp_path / "planted.py"
    f.write_text("def f():\n    " + source)
    assert any(bad in m for m in imported_modules(f))
