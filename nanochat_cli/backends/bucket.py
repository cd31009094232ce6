"""
Pulling a run from a bucket with the cloud's own Python library (boto3 for s3://, google-cloud-storage for
gs://) - both come with SkyPilot's aws / gcp extras that the `cloud` extra installs (README) - rather
than an `aws` / `gsutil` CLI that nothing installs. Sync semantics: a file already here with the bucket's
size is not fetched again (a re-run resumes), every download lands in a temp file renamed into place (an
interrupted pull never leaves half a file under the real name). Verification against MANIFEST.sha256 is
the caller's (pull.verify).

S3-compatible stores: AWS_ENDPOINT_URL (boto3's own variable) points the client elsewhere; we then use
path-style addressing, which such stores expect.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Iterator

from nanochat_core.common import NanochatError
import importlib

SCHEMES = {"s3": "aws", "gs": "gcp"}  # bucket scheme -> the SkyPilot extra (cloud) whose library reads it


def parse(url: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b' -> ('s3', 'bucket', 'a/b')."""
    scheme, sep, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if not sep or scheme not in SCHEMES or not bucket:
        raise NanochatError(f"'{url}' is not a bucket URL nanochat can use: use "
                            + " or ".join(f"{s}://BUCKET" for s in SCHEMES))
    return scheme, bucket, prefix.strip("/")


def _need(module: str, scheme: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        from nanochat_cli.backends.base import install_hint
        raise NanochatError(f"pulling from {scheme}:// needs the {module.split('.')[0]} library: "
                            f"`{install_hint('cloud')}` installs it") from None


def _s3_objects(bucket: str, prefix: str) -> Iterator[tuple[str, int, object]]:
    boto3 = _need("boto3", "s3")
    from botocore.config import Config   # lazy: an optional dependency
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    client = boto3.client("s3", endpoint_url=endpoint,
                          config=Config(s3={"addressing_style": "path"} if endpoint else {}))
    token = None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix + "/"}
        if token:
            kw["ContinuationToken"] = token
        page = client.list_objects_v2(**kw)
        for obj in page.get("Contents", []):
            key = obj["Key"]
            yield key, int(obj["Size"]), (lambda f, k=key: _copy(client.get_object(Bucket=bucket, Key=k)["Body"], f))
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")


def _gs_objects(bucket: str, prefix: str) -> Iterator[tuple[str, int, object]]:
    storage = _need("google.cloud.storage", "gs")
    client = storage.Client()
    for blob in client.list_blobs(bucket, prefix=prefix + "/"):
        yield blob.name, int(blob.size or 0), (lambda f, b=blob: b.download_to_file(f))


def _copy(body, f) -> None:
    for chunk in iter(lambda: body.read(1 << 20), b""):
        f.write(chunk)


def sync(url: str, dest: Path, excludes: list[str]) -> int:
    """Bring every object under `url` into `dest` (names matching `excludes` skipped); returns how many files
    were downloaded this time."""
    scheme, bucket, prefix = parse(url)
    dest.mkdir(parents=True, exist_ok=True)
    listing = _s3_objects if scheme == "s3" else _gs_objects
    fetched = 0
    try:
        for key, size, download in listing(bucket, prefix):
            rel = key[len(prefix) + 1:] if prefix else key
            if not rel or rel.endswith("/") or any(fnmatch.fnmatch(Path(rel).name, p) for p in excludes):
                continue
            target = dest / rel
            if target.is_file() and target.stat().st_size == size:
                continue  # already here (a resumed pull); the manifest check catches a same-size change
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "wb") as f:
                download(f)
            os.replace(tmp, target)
            fetched += 1
    except NanochatError:
        raise
    except Exception as e:  # credentials, a missing bucket, the network: one line, and how to resume
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise NanochatError(f"pulling from {url} failed ({type(e).__name__}: {first}); check that cloud's "
                            "credentials and run `nanochat pull` again (it resumes)") from None
    return fetched
