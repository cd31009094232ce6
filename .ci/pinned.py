"""
pinned.py CONSTRAINTS RESOLVED [NAME...]: exit 1 naming every package of RESOLVED (`name==version` lines, as
`uv pip compile` writes them) that CONSTRAINTS does not pin to that very version; NAMEs are exempt (torch is
pinned by the install command itself, nanochat is this checkout). Plain Python, no packages: it runs before
any venv exists.
"""
import re
import sys


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#")[0].split(";")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower().strip()] = version.strip()
    return out


def main() -> None:
    allowed, resolved = pins(sys.argv[1]), pins(sys.argv[2])
    exempt = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[3:]}
    bad = [f"{n}=={v} (constraints: {allowed.get(n, 'none')})" for n, v in sorted(resolved.items())
           if n not in exempt and allowed.get(n) != v]
    if bad or not resolved:
        sys.exit(f"not pinned by {sys.argv[1]}: " + (", ".join(bad) or f"nothing resolved in {sys.argv[2]}"))
    print(f"all {len(resolved)} packages of {sys.argv[2]} are pinned by {sys.argv[1]}")


if __name__ == "__main__":
    main()
