"""The floors of the house (docs/ARCHITECTURE.md), checked on every import statement, including the ones
inside functions. nanochat_core's packages are stacked; a module imports only its own floor or lower ones:

    stages, bench       (a stage never imports another stage; the library never imports either)
    evaluation
    training
    inference
    gpt
    tasks
    data
    base: common.py, tracking.py, node/

nanochat_core never imports nanochat_cli, typer or sky; in the CLI only backends/skypilot.py imports SkyPilot,
and what the CLI imports from the core at module level is torch-free (so `nanochat --help` stays instant)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "nanochat_core"
CLI = ROOT / "nanochat_cli"
FLOORS = ["base", "data", "tasks", "gpt", "inference", "training", "evaluation", "top"]
TOP = ("stages", "bench")


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module a file imports (absolute names; `from x import y` also counts x.y, which may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def core_package(module: str) -> str | None:
    """The package (or loose module) of nanochat_core a dotted name lies in: 'gpt', 'common', 'stages', ..."""
    parts = module.split(".")
    return parts[1] if parts[0] == "nanochat_core" and len(parts) > 1 else None


def floor_of(package: str) -> int:
    if package in TOP:
        return FLOORS.index("top")
    if package in FLOORS:
        return FLOORS.index(package)
    return FLOORS.index("base")      # common, tracking, node, __version__ ...


def python_files(d: Path) -> list[Path]:
    # data/build_*.py are offline tools that made the bundled data (they use tasks/); not part of the runtime
    return sorted(p for p in d.rglob("*.py") if not p.name.startswith("build_"))


def test_core_floors_are_respected():
    problems = []
    for path in python_files(CORE):
        rel = path.relative_to(ROOT)
        mine = rel.parts[1] if len(rel.parts) > 2 else path.stem
        for m in sorted(imported_modules(path)):
            if m.split(".")[0] in ("nanochat_cli", "typer", "sky"):
                problems.append(f"{rel} (core) imports {m}")
            theirs = core_package(m)
            if theirs is None or theirs == mine:
                continue
            if floor_of(theirs) > floor_of(mine):
                problems.append(f"{rel} ({mine}) imports {m}, a higher floor ({theirs})")
            if mine in TOP and theirs in TOP:
                problems.append(f"{rel} ({mine}) imports {m}: stages and benchmarks use the library only")
        if rel.parts[1] == "stages":
            for m in imported_modules(path):
                parts = m.split(".")
                if parts[:2] == ["nanochat_core", "stages"] and len(parts) > 2 and parts[2] != path.stem:
                    problems.append(f"{rel} imports the stage {m}")
    assert not problems, "\n".join(problems)


def test_cli_rules():
    problems, core_imports = [], set()
    for path in python_files(CLI):
        rel = path.relative_to(ROOT)
        for m in imported_modules(path):
            if m.split(".")[0] == "sky" and rel.as_posix() != "nanochat_cli/backends/skypilot.py":
                problems.append(f"{rel} imports SkyPilot; only backends/skypilot.py may")
        core_imports |= {m for m in imported_modules(path, top_level_only=True) if m.startswith("nanochat_core.")}
    assert not problems, "\n".join(problems)
    # what the CLI imports from the core at module level must not pull torch in
    mods = sorted({m for m in core_imports if (ROOT / (m.replace(".", "/") + ".py")).exists()})
    code = f"import importlib, sys; [importlib.import_module(m) for m in {mods!r}]; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert mods and out.stdout.strip() == "False", f"one of {mods} imports torch"


def test_every_module_is_on_its_package_map():
    """Each package's __init__ docstring is the map of its files: a module missing from it is a module a
    newcomer cannot find."""
    missing = []
    for init in sorted([*CORE.rglob("__init__.py"), *CLI.rglob("__init__.py")]):
        pkg = init.parent
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for p in sorted(pkg.iterdir()):
            name = p.stem if p.suffix == ".py" else p.name
            if p.name in ("__init__.py", "__main__.py", "__pycache__") or p.is_symlink():
                continue
            if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and name not in doc:
                missing.append(f"{p.relative_to(ROOT)} is not named in {init.relative_to(ROOT)}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("source, bad", [
    ("from nanochat_core.stages.chat_sft import x\n", "stages"),
    ("import sky\n", "sky"),
])
def test_the_checker_sees_violations(tmp_path, source, bad):
    """The check above must be able to fail: the same parser finds a planted import, and a planted upward
    import (the model importing the trainer) is ranked above its importer."""
    f = tmp_path / "planted.py"
    f.write_text("def f():\n    " + source)
    assert any(bad in m for m in imported_modules(f))
    assert floor_of(core_package("nanochat_core.training.loop")) > floor_of("gpt")
    assert floor_of("common") < floor_of("data")
