"""Data sources, the bundled corpus, and the downloader against a real (misbehaving) HTTP server on 127.0.0.1."""
import hashlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_core.common import NanochatError, data_dir
from nanochat_core.data.dataset import (download, ensure_bundled, list_shards, load_sources, prepare_data, resolve_source,
                                   split_shards)

FAST = dict(timeout=2.0, retries=4, backoff=0.01, progress=False)


def parquet_bytes(i: int, rows: int = 300) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"shard {i} document {j} " * 20 for j in range(rows)]}), buf, row_group_size=50)
    return buf.getvalue()


class FlakyServer:
    """Serves `files` (with Range support, which the downloader does not use). `plan[name]` is a list of behaviours for successive requests:
    "cut" (send half the body, then drop the connection), "500", "404", "ok",
    "hang" (never answer: wait for `release`, then drop the connection without a response),
    "drip" (a byte every 10 ms, the last one only once `release` is set: the shard cannot finish before the
    test says so; a client that hangs up meanwhile is recorded in `hung_up`).
    `release` is the test's gate, never opened by time; close() opens it so that no handler is left waiting."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.plan, self.log, self.extra_headers = files, {}, [], {}
        self.release, self.hung_up = threading.Event(), threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.log.append((name, rng))
                todo = outer.plan.get(name)
                behaviour = todo.pop(0) if todo else "ok"
                if behaviour == "hang":
                    outer.release.wait(60)   # a hang guard only: the client's own timeout must end it first
                    return
                if behaviour == "404" or name not in outer.files:
                    self.send_error(404)
                    return
                if behaviour == "500":
                    self.send_error(500)
                    return
                data = outer.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                for k, v in outer.extra_headers.get(name, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if behaviour == "drip":
                    sent = 0
                    try:
                        while sent < len(body) - 1 and not outer.release.is_set():
                            self.wfile.write(body[sent:sent + 1])
                            self.wfile.flush()
                            sent += 1
                            time.sleep(0.01)
                        outer.release.wait(60)   # a hang guard only
                        self.wfile.write(body[sent:])
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        outer.hung_up.set()
                    return
                self.wfile.write(body[: len(body) // 2] if behaviour == "cut" else body)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = False, True   # server_close() joins every handler
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"

    def close(self):
        self.release.set()          # no handler stays parked on the gate
        self.httpd.shutdown()
        self.httpd.server_close()   # joins the handler threads: nothing of the server outlives the test
        self.thread.join()


@pytest.fixture
def server():
    files = {f"s{i}.parquet": parquet_bytes(i) for i in range(4)}
    s = FlakyServer(files)
    yield s
    s.close()


def test_flaky_transfer_arrives_whole_and_never_half_visible(server, tmp_path):
    urls = [server.url(f"s{i}.parquet") for i in range(4)]
    server.plan["s1.parquet"] = ["cut", "500", "500", "cut", "ok"]
    server.plan["s3.parquet"] = ["500", "cut", "ok"]
    dest = tmp_path / "data"
    violations, stop = [], threading.Event()
    full = {f"shard_{i:05d}.parquet": len(server.files[f"s{i}.parquet"]) for i in range(4)}

    def watch():   # a reader polling the directory must never see a short file under a final name
        while not stop.is_set():
            for p in list(dest.glob("shard_*.parquet")) if dest.exists() else []:
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    continue
                if size != full[p.name]:
                    violations.append((p.name, size))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        paths = download(urls, 2, dest, workers=3, **FAST)
    finally:
        stop.set()
        watcher.join()
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00003.parquet"]  # 2 train + val
    for p, i in zip(paths, [0, 1, 3]):
        assert p.read_bytes() == server.files[f"s{i}.parquet"]
    assert violations == []
    assert not list(dest.glob(".*"))    # no temp files left behind
    assert sum(name == "s1.parquet" for name, _ in server.log) == 5   # every cut and 500 was retried
    assert ("s2.parquet", None) not in server.log   # the shard beyond num_shards is not fetched
    # a second call finds everything in place and asks the server for nothing
    n = len(server.log)
    assert download(urls, 2, dest, workers=3, **FAST) == paths
    assert len(server.log) == n


def test_permanent_404_is_a_clear_error_without_retries(server, tmp_path):
    with pytest.raises(NanochatError, match="HTTP 404"):
        download([server.url("s0.parquet"), server.url("gone.parquet")], 1, tmp_path, **FAST)
    assert [name for name, _ in server.log].count("gone.parquet") == 1
    assert not (tmp_path / "shard_00001.parquet").exists()


def test_one_failure_stops_the_other_workers(server, tmp_path):
    """s0 drips and cannot finish until the test opens the gate; the other shard is a 404. The call must end
    with the 404 while s0 is still unfinished (its worker stops after its next chunk), not wait for it."""
    server.plan["s0.parquet"] = ["drip"] * 5
    outcome: dict = {}

    def call():
        try:   # a timeout far above the drip's pace: the worker's only way out is the stop, not a read timeout
            download([server.url("s0.parquet"), server.url("gone.parquet")], 1, tmp_path, workers=2, timeout=60,
                     retries=4, backoff=0.01, progress=False)
        except BaseException as e:   # noqa: BLE001  (handed to the test thread below)
            outcome["error"] = e
        else:
            outcome["returned"] = True
    caller = threading.Thread(target=call)
    caller.start()
    try:
        caller.join(timeout=60)             # a hang guard: the call needs well under a second on an idle machine
        waited = caller.is_alive()          # still in there while s0 cannot finish: it is waiting for s0
        # s0 still drips: the server's next write finds the connection closed (hang guard again, not a bound)
        hung_up = not waited and server.hung_up.wait(60)
    finally:
        server.release.set()                # only now can s0 complete
        caller.join()
    assert not waited, "the call waited for the slow shard after the other one failed"
    assert isinstance(outcome.get("error"), NanochatError) and "HTTP 404" in str(outcome["error"]), outcome
    assert hung_up, "the stopped worker kept s0's connection open"
    assert [name for name, _ in server.log].count("s0.parquet") <= 1    # stopped, not retried
    assert not (tmp_path / "shard_00000.parquet").exists()
    assert not list(tmp_path.glob(".*"))   # the stopped worker cleaned up its temp file


def test_url_that_never_answers_times_out(server, tmp_path):
    """The server never answers (its handler waits on a gate the test opens only afterwards): the call can
    end only by its own read timeout, once per attempt, and says so."""
    server.plan["s0.parquet"] = ["hang", "hang", "hang"]
    with pytest.raises(NanochatError, match=r"could not download .* after 2 attempts \(last: ReadTimeout"):
        download([server.url("s0.parquet")], 1, tmp_path, timeout=0.3, retries=1, backoff=0.01, progress=False)
    assert not server.release.is_set()                                   # the server never answered
    assert [name for name, _ in server.log].count("s0.parquet") == 2     # the first attempt, one retry
    assert not list(tmp_path.glob("shard_*"))


def test_refused_connection_and_persistent_500(server, tmp_path):
    with pytest.raises(NanochatError, match="ConnectError"):
        download(["http://127.0.0.1:9/x.parquet"], 1, tmp_path, timeout=0.5, retries=1, backoff=0.01, progress=False)
    server.plan["s0.parquet"] = ["500"] * 10
    with pytest.raises(NanochatError, match="HTTP 500"):
        download([server.url("s0.parquet")], 1, tmp_path, **FAST)


def test_size_and_checksum_from_a_url_list(server, tmp_path):
    data = server.files["s0.parquet"]
    good = tmp_path / "good.txt"
    good.write_text(f"# shards\n{server.url('s0.parquet')} size={len(data)} sha256={hashlib.sha256(data).hexdigest()}\n"
                    f"{server.url('s1.parquet')}\n")
    paths = download(str(good), 1, tmp_path / "a", **FAST)
    assert [p.read_bytes() for p in paths] == [data, server.files["s1.parquet"]]
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{server.url('s0.parquet')} sha256={'0' * 64}\n")
    with pytest.raises(NanochatError, match="sha256 mismatch"):
        download(str(bad), 1, tmp_path / "b", **FAST)
    assert not list((tmp_path / "b").glob("shard_*"))


def test_not_parquet_is_rejected(server, tmp_path):
    server.files["junk.parquet"] = b"<html>rate limited</html>" * 10
    with pytest.raises(NanochatError, match="readable parquet"):
        download([server.url("junk.parquet")], 1, tmp_path, **FAST)
    assert not list(tmp_path.iterdir())


def test_resolve_source(tmp_path):
    sources = load_sources()
    assert {"climbmix", "fineweb-edu", "bundled"} <= set(sources)
    climb = resolve_source("climbmix")
    assert len(climb.urls) == sources["climbmix"]["num_shards"]
    assert climb.urls[0].endswith("shard_00000.parquet") and climb.urls[-1].endswith("shard_06542.parquet")
    assert resolve_source("bundled").bundled
    with pytest.raises(NanochatError, match="unknown data source"):
        resolve_source("no-such-source")
    lst = tmp_path / "l.txt"
    lst.write_text("ftp://example/x.parquet\n")
    with pytest.raises(NanochatError, match="not an http"):
        resolve_source(str(lst))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NanochatError, match="no parquet shards"):
        resolve_source(str(empty))


def test_bundled_corpus_through_the_shard_interface(tmp_path):
    dest = ensure_bundled(tmp_path / "b")
    shards = list_shards(dest)
    assert len(shards) >= 3 and split_shards(dest, "val") == shards[-1:]
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    assert total > 1000
    for p in shards[:-1]:
        assert pq.ParquetFile(p).num_row_groups >= 4   # enough row groups for a meaningful 2-rank split
    texts = pq.read_table(shards[0]).column("text").to_pylist()
    assert max(len(t) for t in texts) <= 10_000 and min(len(t) for t in texts) > 0
    # idempotent, repairs a damaged copy, removes shards that are not part of the bundle
    shards[0].write_bytes(b"damaged")
    (dest / "shard_00099.parquet").write_bytes(b"stale")
    (dest / ".shard_00000.parquet.part").write_bytes(b"in progress")
    assert list_shards(ensure_bundled(dest)) == shards
    assert pq.ParquetFile(shards[0]).metadata.num_rows == len(texts)
    # prepare_data puts it under $NANOCHAT_HOME/data/bundled and a local directory is used where it is
    assert prepare_data("bundled") == data_dir() / "bundled"
    assert prepare_data(str(dest)) == dest
    linked = download(str(dest), None, tmp_path / "linked", progress=False)
    assert [p.name for p in linked] == [p.name for p in shards] and all(p.is_symlink() for p in linked)
