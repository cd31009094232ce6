"""`nanochat pull` only verifies files inside the run directory, and its rsync never trusts any host key:
the real rsync and the real ssh client (its `-G` mode prints the options it would use without connecting);
the only stand-in is the network hop itself (a `ssh` that runs the remote command on this machine)."""
import hashlib
import os
import shlex
import shutil
import subprocess
import textwrap

import pytest

from nanochat_cli import pull, state
from nanochat_core.common import NanochatError

needs_rsync = pytest.mark.needs_tool("rsync")   # skipped with a reason where missing; a failure under CI=true
needs_ssh = pytest.mark.needs_tool("ssh")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run_with_manifest(tmp_path, extra_lines):
    rd = tmp_path / "run"
    (rd / "sft" / "ckpt_000001").mkdir(parents=True)
    (rd / "sft" / "ckpt_000001" / "model.safetensors").write_bytes(b"weights")
    (rd / "report.md").write_text("# report\n")
    lines = [f"{_sha(b'weights')}  sft/ckpt_000001/model.safetensors", f"{_sha(b'# report' + chr(10).encode())}  report.md"]
    (rd / "MANIFEST.sha256").write_text("\n".join(lines + extra_lines) + "\n")
    return rd


def test_an_honest_manifest_verifies(tmp_path):
    assert pull.verify(_run_with_manifest(tmp_path, [])) == 2


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "sft/../../x", "~/x"])
def test_manifest_lines_outside_the_run_dir_are_refused(tmp_path, rel):
    """The named file exists and its hash in the manifest is right: only confinement can refuse it."""
    target = tmp_path / "x"
    target.write_bytes(b"outside")
    digest = _sha(target.read_bytes()) if not rel.startswith("/") else _sha(open(rel, "rb").read())
    rd = _run_with_manifest(tmp_path, [f"{digest}  {rel}"])
    with pytest.raises(NanochatError, match="outside the run directory"):
        pull.verify(rd)


def test_a_symlink_leading_out_of_the_run_dir_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret")
    rd = _run_with_manifest(tmp_path, [f"{_sha(b's3cret')}  notes.txt"])
    (rd / "notes.txt").symlink_to(secret)
    with pytest.raises(NanochatError, match="outside the run directory"):
        pull.verify(rd)


def _sky_like_config(tmp_path, cluster):
    """What SkyPilot writes for a cluster (~/.sky/generated/ssh/<name>): host-key checking off."""
    cfg = tmp_path / "ssh_config"
    cfg.write_text(textwrap.dedent(f"""\
        Host {cluster}
          HostName 192.0.2.10
          User ubuntu
          IdentityFile ~/.ssh/sky-key
          IdentitiesOnly yes
          StrictHostKeyChecking no
          UserKnownHostsFile=/dev/null
          GlobalKnownHostsFile=/dev/null
          Port 22
        """))
    return cfg


def _record_cluster(name, launched_at):
    state.save_cluster(state.new_cluster_record(name, "sky", {"price_per_hour": 1.0}) | {"launched_at": launched_at})


@needs_ssh
def test_ssh_options_override_skypilots_blind_trust(tmp_path):
    _record_cluster("c1", 1700000000.0)
    argv = shlex.split(pull.ssh_command("c1"))
    # The real ssh client resolves our options against SkyPilot's config the way a real pull would.
    out = subprocess.run(argv + ["-F", str(_sky_like_config(tmp_path, "c1")), "-G", "c1"], capture_output=True,
                         text=True, check=True).stdout
    opts = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert opts["stricthostkeychecking"] == "accept-new"  # a changed key is refused; only a first contact is learned
    pinned = pull.known_hosts_file("c1")
    assert opts["userknownhostsfile"] == str(pinned) and opts["globalknownhostsfile"] == "/dev/null"
    assert opts["hostkeyalias"] == "nanochat-c1"
    assert opts["hostname"] == "192.0.2.10" and opts["user"] == "ubuntu"  # the rest still from SkyPilot
    # a cluster launched again under the same name starts a new pin; the old one is not reused
    _record_cluster("c1", 1700009999.0)
    assert pull.known_hosts_file("c1") != pinned


@needs_rsync
@needs_ssh
def test_rsync_pull_uses_the_pinned_host_key_options(tmp_path, monkeypatch):
    """A full rsync-over-ssh pull; the `ssh` on PATH checks its options with the real client, records them,
    and runs the remote side (rsync --server) here instead of on a node."""
    _record_cluster("c2", 1700000000.0)
    remote = _run_with_manifest(tmp_path, [])
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ssh_argv"
    real_ssh = shutil.which("ssh")
    (bindir / "ssh").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        printf '%s\\n' "$@" > {log}
        opts=""
        while [ $# -gt 0 ]; do case "$1" in -o|-p|-l|-i|-F) opts="$opts $1 $2"; shift 2;; -*) opts="$opts $1"; shift;;
                                             *) break;; esac; done
        {real_ssh} $opts -G "$1" >/dev/null || exit 255
        shift
        exec sh -c "$*"
        """))
    (bindir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    dest = tmp_path / "home_copy"
    pull.rsync(f"c2:{remote}", dest, ssh=True)
    assert pull.verify(dest) == 2
    argv = log.read_text().splitlines()
    assert "StrictHostKeyChecking=no" not in argv and "StrictHostKeyChecking=accept-new" in argv
    assert f"UserKnownHostsFile={pull.known_hosts_file('c2')}" in argv
