"""
Write constraints.txt: the exact versions of everything `pip install -e '.[dev]'` (and the cloud/tasks extras)
pulls in, read from a virtual environment where that install works and the tests pass.

    .venv/bin/python .ci/lock.py > constraints.txt

Why: with loose lower bounds only, an old pip's resolver (23.0.1 is what a Debian 12 python3 venv gets) tried
version after version of huggingface-hub, httpx, click, uvicorn, typer... for more than 25 minutes. With every
package pinned there is exactly one candidate each, so any pip resolves in one pass; the README's commands pass
`-c constraints.txt`.

What is (not) pinned, and why:
- only the dependency closure of nanochat's own requirements and extras, walked through the installed
  packages' metadata - not whatever else happens to sit in the venv;
- not pip, setuptools, wheel (a dependency names them loosely; pinning would move the venv's own installer)
- not torch itself: the install command names it (`torch==2.13.0`; a GPU user brings a CUDA build), and its
  platform-only dependencies (CUDA libraries, triton) are not installed on a CPU machine anyway;
- a pin whose release does not support every Python we support (requires-python >= 3.10) gets a
  `python_version` marker, so an older Python resolves that one package freely instead of failing.
"""
from __future__ import annotations

import importlib.metadata as md
import sys

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = "nanochat"
EXTRAS = ("dev", "cloud", "tasks")
NOT_PINNED = {"torch", ROOT, "pip", "setuptools", "wheel"}
SUPPORTED_PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def root_requirements() -> list[Requirement]:
    """Our own requirements from this checkout's pyproject.toml (not the venv's copy of our metadata, which
    is stale whenever pyproject changed since the venv was made)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip carries the same parser
        from pip._vendor import tomli as tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"].get(extra, [])
    return [Requirement(r) for r in reqs]


def closure() -> dict[str, md.Distribution]:
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in root_requirements()
            if r.marker is None or r.marker.evaluate()]
    seen: set[tuple[str, frozenset[str]]] = set()
    found: dict[str, md.Distribution] = {}
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a dependency for another platform / Python (its marker excluded it here)
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return found


def main() -> None:
    lines = []
    for name, dist in sorted(closure().items()):
        if name in NOT_PINNED:
            continue
        pin = f"{dist.metadata['Name']}=={dist.version}"
        rp = dist.metadata.get("Requires-Python")
        if rp:
            ok = [v for v in SUPPORTED_PYTHONS if SpecifierSet(rp).contains(v + ".0")]
            if ok and ok != list(SUPPORTED_PYTHONS):
                Marker(f'python_version >= "{ok[0]}"')  # validates what we write
                pin += f'; python_version >= "{ok[0]}"'
        lines.append(pin)
    print("# Exact versions the tests pass with; regenerate with: .venv/bin/python .ci/lock.py > constraints.txt")
    print(f"# (Python {sys.version.split()[0]}; torch is pinned by the install command itself)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
