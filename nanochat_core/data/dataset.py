"""
Pre-training data: parquet shards with a "text" column, the LAST shard of a source being validation.

Where shards come from is data, not code (nanochat_core/data/sources.json):
  - "climbmix"    NVIDIA ClimbMix-400B shuffle shards (default on the cloud)
  - "fineweb-edu" FineWeb-Edu 100B shuffle shards
  - "bundled"     the small public-domain corpus shipped inside the package (the local default, and tests)
plus, given as the source argument instead of a name: a local directory of shards, or a text file
listing shard URLs (one per line, optionally followed by `size=<bytes>` and/or `sha256=<hex>`).

The downloader: parallel workers, retries with exponential backoff, bytes written to a hidden `.part` file
and renamed into place only once complete and verified (length, size / sha256 where listed, a readable
parquet footer). So a reader never sees a half shard under its final name; a killed download keeps every
finished shard and fetches the rest when run again.

    python -m nanochat_core.data.dataset --source climbmix -n 8      # 8 training shards + the validation shard
"""
from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from nanochat_core.common import NanochatError, atomic_write_bytes, data_dir, emit, run_main, sha256_file
import pyarrow.parquet as pq
import httpx
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

PACKAGE_DATA = Path(__file__).resolve().parent
SOURCES_FILE = PACKAGE_DATA / "sources.json"
BUNDLED_DIR = PACKAGE_DATA / "bundled"
DEFAULT_SOURCE = "climbmix"
PERMANENT_HTTP = {400, 401, 403, 404, 410}    # asking again will not help


@dataclass
class Source:
    name: str
    urls: list[str] = field(default_factory=list)       # every shard of the source, in order; last = validation
    local_dir: Path | None = None                       # shards already on disk: nothing to download
    bundled: bool = False
    sizes: dict[int, int] = field(default_factory=dict)    # shard index -> bytes, where known
    sha256: dict[int, str] = field(default_factory=dict)   # shard index -> hex digest, where known


def load_sources() -> dict[str, dict]:
    return json.loads(SOURCES_FILE.read_text(encoding="utf-8"))


def resolve_source(spec: str | os.PathLike | list[str] | Source) -> Source:
    """A source name from sources.json, a local directory of parquet shards, a file listing shard URLs,
    or a list of URLs."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, list):
        return _url_list_source("urls", [str(u) for u in spec])
    sources = load_sources()
    if str(spec) in sources:
        entry = sources[str(spec)]
        if entry.get("bundled"):
            return Source(name=str(spec), bundled=True)
        urls = [entry["url_template"].format(index=i) for i in range(int(entry["num_shards"]))]
        return Source(name=str(spec), urls=urls)
    path = Path(spec).expanduser()
    if path.is_dir():
        list_shards(path)  # fails clearly if there are none
        return Source(name=path.name, local_dir=path)
    if path.is_file():
        lines = [ln.split("#")[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return _url_list_source(path.stem, [ln for ln in lines if ln])
    raise NanochatError(f"unknown data source {str(spec)!r}: use one of {', '.join(sources)}, "
                        "a directory of parquet shards, or a file listing shard URLs")


def _url_list_source(name: str, lines: list[str]) -> Source:
    src = Source(name=name)
    for i, line in enumerate(lines):
        url, *extras = line.split()
        if not url.startswith(("http://", "https://")):
            raise NanochatError(f"line {i + 1} of the URL list is not an http(s) URL: {url!r}")
        src.urls.append(url)
        for extra in extras:
            key, _, value = extra.partition("=")
            if key == "size" and value.isdigit():
                src.sizes[i] = int(value)
            elif key == "sha256" and len(value) == 64:
                src.sha256[i] = value.lower()
            else:
                raise NanochatError(f"line {i + 1} of the URL list: expected size=<bytes> or sha256=<hex>, got {extra!r}")
    if not src.urls:
        raise NanochatError(f"the URL list {name!r} is empty")
    return src


# -----------------------------------------------------------------------------
# Shards on disk

def list_shards(directory: str | os.PathLike) -> list[Path]:
    """Sorted parquet shards of a data directory; the last one is the validation shard.
    Hidden files (downloads in progress) are never listed."""
    d = Path(directory)
    shards = sorted(p for p in d.glob("*.parquet") if not p.name.startswith(".")) if d.is_dir() else []
    if not shards:
        raise NanochatError(f"no parquet shards in {d}: run `python -m nanochat_core.data.dataset` or pass a directory with *.parquet files")
    return shards


def split_shards(directory: str | os.PathLike, split: str) -> list[Path]:
    """train = every shard but the last, val = the last one."""
    shards = list_shards(directory)
    if split not in ("train", "val"):
        raise NanochatError(f"split must be 'train' or 'val', got {split!r}")
    if len(shards) < 2:
        raise NanochatError(f"{directory} has {len(shards)} shard: need at least 2 (the last one is validation)")
    return shards[:-1] if split == "train" else shards[-1:]


def open_parquet(path: str | os.PathLike, column: str = "text"):
    """pyarrow ParquetFile with a clear error for a file that is not readable parquet or lacks `column`."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for the same problem
        raise NanochatError(f"cannot read parquet shard {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "delete it and download again") from None
    if column not in pf.schema_arrow.names:
        raise NanochatError(f"parquet shard {path} has no {column!r} column (columns: {pf.schema_arrow.names})")
    return pf


def ensure_bundled(dest: str | os.PathLike) -> Path:
    """Put the bundled corpus in `dest` as ordinary parquet shards (same interface as downloaded data).
    Cheap when already there: files whose size and hash match are left alone."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shipped = sorted(BUNDLED_DIR.glob("shard_*.parquet"))
    if not shipped:
        raise NanochatError(f"the bundled corpus is missing from {BUNDLED_DIR}: reinstall nanochat")
    names = {p.name for p in shipped}
    for stale in dest.glob("shard_*.parquet"):
        if stale.name not in names:
            stale.unlink()
    for src in shipped:
        dst = dest / src.name
        if dst.is_file() and dst.stat().st_size == src.stat().st_size and sha256_file(dst) == sha256_file(src):
            continue
        atomic_write_bytes(dst, src.read_bytes())
    return dest


# -----------------------------------------------------------------------------
# Downloading

def _shard_indices(total: int, num_shards: int | None) -> list[int]:
    """The first num_shards training shards plus the validation shard (the source's last)."""
    if total < 2:
        return list(range(total))
    n_train = total - 1 if num_shards is None or num_shards < 0 else min(num_shards, total - 1)
    return list(range(n_train)) + [total - 1]


def download(source: str | Source | list[str], num_shards: int | None, dest: str | os.PathLike, workers: int = 8,
             *, timeout: float = 30.0, retries: int = 6, backoff: float = 2.0, progress: bool = True) -> list[Path]:
    """Download the first `num_shards` training shards (None/-1: all) and the validation shard into `dest`.
    Returns the shard paths in order. Raises NanochatError when a shard cannot be fetched."""

    src = resolve_source(source)
    dest = Path(dest)
    if src.bundled:
        return list_shards(ensure_bundled(dest))
    if src.local_dir is not None:
        return _link_local(src.local_dir, dest)
    dest.mkdir(parents=True, exist_ok=True)
    indices = _shard_indices(len(src.urls), num_shards)
    finals = {i: dest / f"shard_{i:05d}.parquet" for i in indices}
    todo = [i for i in indices if not _complete(finals[i], src.sizes.get(i), src.sha256.get(i))]
    if not todo:
        return [finals[i] for i in indices]

    bar = Progress(TextColumn("[bold]data[/] {task.fields[done]}/{task.fields[n]} shards"), BarColumn(),
                   DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), disable=not progress, transient=False)
    task = bar.add_task("download", total=None, done=0, n=len(todo))
    lock = threading.Lock()
    known_total = [0]

    def add_total(n: int) -> None:
        with lock:
            known_total[0] += n
            bar.update(task, total=known_total[0])

    stop = threading.Event()   # set on the first failure (or Ctrl-C): the other workers stop after their next chunk

    def on_bytes(n: int) -> None:
        if stop.is_set():
            raise _Stopped()
        bar.advance(task, n)

    plain = progress and not bar.console.is_terminal   # logs (e.g. streamed from the cloud): a line per shard
    t0 = time.time()
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with bar, httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True, limits=limits) as client:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download") as pool:
            futures = {pool.submit(_fetch_one, client, src.urls[i], finals[i], src.sizes.get(i), src.sha256.get(i),
                                   retries, backoff, on_bytes, add_total): i for i in todo}
            done = 0
            try:
                for fut in as_completed(futures):
                    path = fut.result()
                    done += 1
                    bar.update(task, done=done)
                    if plain:
                        print(f"data: {path.name} ({done}/{len(todo)}, {time.time() - t0:.0f}s)", flush=True)
            except BaseException:
                stop.set()
                for f in futures:
                    f.cancel()
                raise
    return [finals[i] for i in indices]


class _Stopped(Exception):
    """Another shard failed: this worker stops early."""


def _link_local(src_dir: Path, dest: Path) -> list[Path]:
    """A local directory used as a source: its shards appear in dest as symlinks (nothing is copied)."""
    shards = list_shards(src_dir)
    if dest.resolve() == src_dir.resolve():
        return shards
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in shards:
        link = dest / p.name
        if not (link.is_symlink() and link.resolve() == p.resolve()):
            tmp = dest / f".{p.name}.link"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(p.resolve())
            os.replace(tmp, link)
        out.append(link)
    return out


def _complete(path: Path, size: int | None, sha: str | None) -> bool:
    if not path.is_file():
        return False
    if size is not None and path.stat().st_size != size:
        return False
    return sha is None or sha256_file(path) == sha


def _fetch_one(client, url: str, final: Path, size: int | None, sha: str | None, retries: int, backoff: float,
               on_bytes, on_total) -> Path:
    """One shard: GET into a hidden .part file, verify, rename into place. A cut transfer starts over (shards
    are ~100 MB: a retry costs seconds on a cloud node, and no partial state can be wrong)."""

    part = final.with_name(f".{final.name}.part")
    last_error, announced = "no attempt made", False
    try:
        for attempt in range(retries + 1):
            if attempt:
                # exponential backoff with jitter, capped at a minute: a throttled server gets room to recover
                time.sleep(min(60.0, backoff * 2 ** (attempt - 1)) * (1 + 0.25 * random.random()))
            got = 0
            try:
                with client.stream("GET", url, headers=_auth_headers(url)) as r:
                    if r.status_code in PERMANENT_HTTP:
                        raise NanochatError(f"{url} answered HTTP {r.status_code}: the shard does not exist or is not "
                                            "accessible; check the source")
                    if r.status_code >= 500 or r.status_code == 429:
                        last_error = f"HTTP {r.status_code}"
                        continue
                    if r.status_code != 200:
                        raise NanochatError(f"{url} answered HTTP {r.status_code}, which the downloader does not understand")
                    if not announced:
                        on_total(int(r.headers.get("content-length", "0")))
                        announced = True
                    with open(part, "wb") as f:
                        for chunk in r.iter_bytes():
                            f.write(chunk)
                            got += len(chunk)
                            on_bytes(len(chunk))
                        f.flush()
                        os.fsync(f.fileno())
                    length = int(r.headers.get("content-length", "-1"))
            except httpx.HTTPError as e:         # timeouts, refused/reset connections, bodies cut short
                last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if 0 <= length != got:
                last_error = f"short download ({got} of {length} bytes)"
                continue
            if (size is not None and got != size) or (sha and sha256_file(part) != sha):
                last_error = "size or sha256 mismatch"
                continue
            try:
                open_parquet(part)
            except NanochatError:
                raise NanochatError(f"{url} did not deliver a readable parquet file with a 'text' column") from None
            os.replace(part, final)
            return final
        raise NanochatError(f"could not download {url} after {retries + 1} attempts (last: {last_error}); "
                            "check the network and run again - shards already finished are kept")
    finally:
        part.unlink(missing_ok=True)   # a failure or Ctrl-C leaves no temp file; after success it is gone


def _auth_headers(url: str) -> dict[str, str]:
    """A Hugging Face token raises the anonymous rate limit; sent only to Hugging Face hosts."""
    token = os.environ.get("HF_TOKEN")
    host = url.split("/")[2] if "://" in url else ""
    return {"Authorization": f"Bearer {token}"} if token and (host == "huggingface.co" or host.endswith(".huggingface.co")) else {}


# -----------------------------------------------------------------------------

def prepare_data(source: str | os.PathLike | list[str] = DEFAULT_SOURCE, num_shards: int | None = 8,
                 workers: int = 8) -> Path:
    """The data directory to train on: the bundled corpus unpacked, a local directory as is, or
    $NANOCHAT_HOME/data/<source>/ with `num_shards` training shards + the validation shard downloaded."""
    src = resolve_source(source)
    t0 = time.time()
    emit("stage_start", stage="data", source=src.name)
    if src.bundled:
        out = ensure_bundled(data_dir() / src.name)
    elif src.local_dir is not None:
        out = src.local_dir
    else:
        out = data_dir() / src.name
        download(src, num_shards, out, workers)
    emit("stage_end", stage="data", seconds=round(time.time() - t0, 2), path=str(out), shards=len(list_shards(out)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Download / unpack pre-training shards.")
    ap.add_argument("--source", default=DEFAULT_SOURCE,
                    help=f"one of {', '.join(load_sources())}, a directory of shards, or a file of shard URLs")
    ap.add_argument("-n", "--num-shards", type=int, default=8, help="training shards to fetch (-1: all); the validation shard always comes too")
    ap.add_argument("-w", "--workers", type=int, default=8)
    args = ap.parse_args()
    out = prepare_data(args.source, args.num_shards, args.workers)
    print(f"{len(list_shards(out))} shards in {out} (last = validation)")


def iter_training_text(data: str | Path, max_chars: int, doc_cap: int, on_chars=None) -> Iterator[str]:
    """Documents of the train split in shard / row-group order, each cropped to doc_cap, max_chars in all."""
    seen = 0
    for shard in split_shards(data, "train"):
        pf = open_parquet(shard)
        for g in range(pf.num_row_groups):
            for text in pf.read_row_group(g, columns=["text"]).column("text").to_pylist():
                if not text:
                    continue
                text = text[:doc_cap][: max_chars - seen]
                seen += len(text)
                if on_chars:
                    on_chars(seen)
                yield text
                if seen >= max_chars:
                    return


if __name__ == "__main__":
    run_main(main)
