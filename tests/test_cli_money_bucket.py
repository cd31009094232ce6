"""Item: after `pip install '.[cloud]'`, every cloud the offers table can pick and every bucket scheme
--bucket takes is covered by SkyPilot's own extras; pulling from a bucket uses the cloud's Python library
(boto3 here) against a real HTTP server on 127.0.0.1 that speaks the two S3 calls a pull makes
(ListObjectsV2, GetObject) - no `aws`/`gsutil` CLI anywhere on PATH."""
import hashlib
import http.server
import importlib.metadata as md
import re
import threading
import tomllib
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse
from xml.sax.saxutils import escape

import pytest
from typer.testing import CliRunner

from nanochat_cli import state
from nanochat_cli.main import app

ROOT = Path(__file__).resolve().parent.parent


def test_the_cloud_extra_covers_every_offered_cloud_and_bucket_scheme():
    from nanochat_cli.backends.bucket import SCHEMES
    from nanochat_cli.planning.offers import GPU_CLOUDS
    cloud = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cloud"]
    (sky_req,) = [r for r in cloud if r.startswith("skypilot")]
    extras = set(re.search(r"\[(.*)\]", sky_req).group(1).split(","))
    assert set(GPU_CLOUDS) <= extras and set(SCHEMES.values()) <= extras
    # ... and SkyPilot itself (the installed 0.14.1) defines each of those extras.
    provided = set(md.metadata("skypilot").get_all("Provides-Extra"))
    assert extras <= provided, extras - provided


class FakeS3(http.server.BaseHTTPRequestHandler):
    """Objects from a local directory: root/<bucket>/<key>. Path-style requests only."""
    root: Path

    def do_GET(self):
        url = urlparse(self.path)
        bucket, _, key = unquote(url.path.lstrip("/")).partition("/")
        q = parse_qs(url.query)
        base = self.root / bucket
        if not key and q.get("list-type") == ["2"]:
            prefix = q.get("prefix", [""])[0]
            items = sorted(p for p in base.rglob("*") if p.is_file() and p.relative_to(base).as_posix().startswith(prefix))
            body = "".join(f"<Contents><Key>{escape(p.relative_to(base).as_posix())}</Key><Size>{p.stat().st_size}"
                           f"</Size><ETag>\"{hashlib.md5(p.read_bytes()).hexdigest()}\"</ETag>"
                           "<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>" for p in items)
            xml = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
                   f'2006-03-01/"><Name>{bucket}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(items)}'
                   f'</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{body}</ListBucketResult>')
            return self._send(200, xml.encode(), "application/xml")
        p = base / key
        if p.is_file():
            self.requested.append(key)
            return self._send(200, p.read_bytes(), "application/octet-stream")
        self._send(404, b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code></Error>', "application/xml")

    def _send(self, code, data, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def s3(tmp_path, monkeypatch):
    pytest.importorskip("boto3")  # comes with the [cloud] / [dev] extras (skypilot[aws])
    FakeS3.root = tmp_path / "s3"
    FakeS3.requested = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "NO_PROXY": "127.0.0.1",
                 "PATH": "/usr/bin:/bin"}.items():
        monkeypatch.setenv(k, v)
    for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    yield FakeS3
    server.shutdown()


def test_pull_from_an_s3_bucket_uses_the_library_and_is_verified(s3, tmp_path, monkeypatch):
    from nanochat_cli.backends import skypilot as sky_backend
    from nanochat_core.stages.pipeline import write_manifest
    remote = s3.root / "my-bucket" / "runs" / "b1"
    (remote / "base" / "ckpt_000010").mkdir(parents=True)
    (remote / "base" / "ckpt_000010" / "model.safetensors").write_bytes(b"weights" * 100)
    (remote / "base" / "ckpt_000010" / "optim_rank000.pt").write_bytes(b"optimizer" * 100)
    (remote / "report.md").write_text("# report\n")
    write_manifest(remote)
    monkeypatch.setattr(sky_backend.SkyBackend, "job_state", lambda self, rec, rd: "SUCCEEDED")
    rd = state.run_dir("b1")
    state.write_job(rd, {"backend": "sky", "cluster": "gone", "run": "b1", "job_id": 4, "managed": False})
    from nanochat_core.common import atomic_write_json
    atomic_write_json(rd / "plan.json", {"bucket": "s3://my-bucket", "price_per_hour": 36.0})   # today's shape
    r = CliRunner().invoke(app, ["pull", "--name", "b1", "--dest", str(tmp_path / "copy")])
    assert r.exit_code == 0, r.stderr
    assert "2 files verified" in r.stdout
    assert (tmp_path / "copy" / "base" / "ckpt_000010" / "model.safetensors").read_bytes() == b"weights" * 100
    assert not (tmp_path / "copy" / "base" / "ckpt_000010" / "optim_rank000.pt").exists()   # stays behind
    # A second pull resumes: nothing already here is fetched again.
    before = len(s3.requested)
    r = CliRunner().invoke(app, ["pull", "--name", "b1", "--dest", str(tmp_path / "copy")])
    assert r.exit_code == 0 and len(s3.requested) == before, r.stderr
    # A file that changed in the bucket after the manifest was written is caught.
    (remote / "report.md").write_text("# tampered\n")
    r = CliRunner().invoke(app, ["pull", "--name", "b1", "--dest", str(tmp_path / "copy2")])
    assert r.exit_code == 2 and "report.md" in r.stderr and "checksum" in r.stderr


def test_a_bucket_scheme_we_cannot_use_is_refused_at_plan_time():
    r = CliRunner().invoke(app, ["train", "--budget", "100", "--bucket", "ftp://x", "--dryrun"])
    assert r.exit_code == 2 and "s3://BUCKET" in r.stderr
