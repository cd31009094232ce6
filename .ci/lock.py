"""
Write constraints.txt: the exact versions of everything `pip install -e '.[dev,cloud,tasks]'` pulls in, read
from a virtual environment where that install works and the tests pass, plus what only the GPU node installs.

    .venv/bin/pip install -c constraints.txt torch==2.13.0 -e '.[dev,cloud,tasks]'
    .venv/bin/python .ci/lock.py > constraints.txt

Why: with loose lower bounds only, an old pip's resolver (23.0.1 is what a Debian 12 python3 venv gets) tried
version after version of huggingface-hub, httpx, click, uvicorn, typer... for more than 25 minutes. With every
package pinned there is exactly one candidate each, so any pip resolves in one pass; the README's commands pass
`-c constraints.txt`.

What is (not) pinned, and why:
- only the dependency closure of nanochat's own requirements and extras, walked through the installed
  packages' metadata - not whatever else happens to sit in the venv;
- not pip, setuptools, wheel (a dependency names them loosely; pinning would move the venv's own installer) -
  except setuptools in the node's section below: the CUDA build of torch requires it and the node's fresh venv
  has none (in a pip venv that pin moves setuptools only where a package requires it);
- not torch itself: the install command names it (`torch==2.13.0`; a GPU user brings a CUDA build), and its
  platform-only dependencies (CUDA libraries, triton) are not installed on a CPU machine anyway;
- a pin whose release does not support every Python we support (requires-python >= 3.10) gets a
  `python_version` marker, so an older Python resolves that one package freely instead of failing.

Every extra must be installed in that venv: a requirement it lacks is an error here, not a silent gap. (A lock
once made from a dev-only venv pinned paramiko 5 for the cloud install, whose azure-cli needs paramiko < 4:
the README's cloud command could not resolve at all.)

The GPU node installs `torch==2.13.0 -e '.[tasks]'` with uv (sky/train.yaml). There torch is the CUDA build,
whose CUDA libraries (nvidia-*, cuda-*, triton) a CPU venv never has, and some of them torch names only by a
range. uv resolves the node's install for Linux x86_64 from package metadata alone (seconds, nothing
downloaded) with the pins above as constraints; the packages it adds are pinned in a section of their own.
"""
from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = "nanochat"
EXTRAS = ("dev", "cloud", "tasks")
NOT_PINNED = {"torch", ROOT, "pip", "setuptools", "wheel"}
SUPPORTED_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
NODE_PLATFORM = "x86_64-manylinux_2_28"   # the GPU nodes SkyPilot launches: Linux on x86_64


def root_requirements(extras=EXTRAS) -> list[Requirement]:
    """Our own requirements from this checkout's pyproject.toml (not the venv's copy of our metadata, which
    is stale whenever pyproject changed since the venv was made)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip carries the same parser
        from pip._vendor import tomli as tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"].get(extra, [])
    return [Requirement(r) for r in reqs]


def closure(ours=EXTRAS) -> dict[str, md.Distribution]:
    todo = [(canonicalize_name(r.name), frozenset(r.extras)) for r in root_requirements(ours)
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
            # Its marker applies here (those that do not were skipped below), so the venv is incomplete and
            # a lock made from it would leave this package, and what it needs, unpinned.
            sys.exit(f"lock.py: {name} is required but not installed in {sys.prefix}; install "
                     f"'.[{','.join(ours)}]' there first")
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return found


def node_only_pins(pinned: list[str]) -> list[str]:
    """What the GPU node's install adds to `pinned`: uv resolves it for NODE_PLATFORM, constrained by them."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        sys.exit("lock.py: uv (a dev requirement) is not installed")
    torch = md.version("torch").split("+")[0]   # the CPU build's 2.13.0+cpu is the node's 2.13.0
    root = Path(__file__).resolve().parent.parent
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as cons:
        cons.write("\n".join(pinned + [f"torch=={torch}"]) + "\n")
        cons.flush()
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        out = subprocess.run([uv, "pip", "compile", "-q", "--no-header", "--no-annotate", "--python-version", py,
                              "--python-platform", NODE_PLATFORM, "--extra", "tasks", "-c", cons.name,
                              str(root / "pyproject.toml")], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"lock.py: the node's install does not resolve with these pins:\n{out.stderr}")
    # Everything but torch (the install command names it) and nanochat: setuptools too (see the docstring).
    have = {canonicalize_name(p.split("==")[0]) for p in pinned} | {"torch", ROOT}
    return [line.strip() for line in out.stdout.splitlines()
            if "==" in line and canonicalize_name(line.split("==")[0]) not in have]


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description="print the pins for constraints.txt")
    ap.add_argument("--extras", default=",".join(EXTRAS), help="the extras whose closure is pinned (installed here)")
    ap.add_argument("--no-node", action="store_true",
                    help="leave out the GPU node's own pins (their resolution reads package metadata online)")
    a = ap.parse_args()
    lines = []
    for name, dist in sorted(closure(tuple(a.extras.split(","))).items()):
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
    if not a.no_node:
        print("# Only on the GPU node (the CUDA build of torch), resolved for Linux x86_64:")
        print("\n".join(node_only_pins(lines)))


if __name__ == "__main__":
    main()
