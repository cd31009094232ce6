"""Every way of loading a checkpoint verifies it, and every damaged one is one line and exit code 2:
a checkpoint dir named directly is sha256-checked, meta.json vouches for itself, file entries cannot leave
the checkpoint dir, and a save that runs out of disk cleans up and says so. Real files, the real CLI."""
import builtins
import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
import torch.nn as nn

from nanochat_core.gpt import checkpoint
from nanochat_core.gpt.checkpoint import find_latest, load_checkpoint, save_checkpoint, verify_checkpoint
from nanochat_core.common import NanochatError

PY = sys.executable


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _save(stage, step, model=None, **kw):
    model = model or _tiny_net()
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(stage, step, model, opt, {"stage": "test"}, 0, 1, **kw)


def _rewrite_meta(ckpt, edit, rehash=True):
    """Edit meta.json like a person (or a bad tool) would; rehash=True also fixes meta_sha256, so only the
    check under test can catch it."""
    meta = json.loads((ckpt / "meta.json").read_text())
    edit(meta)
    if rehash:
        meta["meta_sha256"] = checkpoint.meta_digest(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# -----------------------------------------------------------------------------
# meta.json

def test_meta_json_is_covered_by_its_own_hash(tmp_path, capsys):
    _save(tmp_path / "s", 1)
    ckpt = _save(tmp_path / "s", 2)
    assert verify_checkpoint(ckpt) is None
    _rewrite_meta(ckpt, lambda m: m["config"].update(n_layer=99), rehash=False)  # valid JSON, wrong content
    assert "own sha256" in verify_checkpoint(ckpt)
    assert find_latest(tmp_path / "s").name == "ckpt_000001"
    assert "ckpt_000002 is corrupt" in capsys.readouterr().err
    with pytest.raises(NanochatError, match="own sha256"):
        load_checkpoint(ckpt, _tiny_net())


def test_a_checkpoint_saved_before_meta_hashed_itself_still_resumes(tmp_path, capsys):
    """Older checkpoints have no meta_sha256: still loaded (a resumed run must not start over), with a
    warning, and every other check still applies."""
    ckpt = _save(tmp_path / "s", 1)
    _rewrite_meta(ckpt, lambda m: m.pop("meta_sha256"), rehash=False)
    assert find_latest(tmp_path / "s") == ckpt
    assert "older nanochat" in capsys.readouterr().err
    load_checkpoint(ckpt, _tiny_net())
    _flip_last_byte(ckpt / "model.safetensors")
    assert "sha256" in verify_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/model.safetensors", "notes.txt"])
def test_file_entries_cannot_leave_the_checkpoint_dir(tmp_path, name, monkeypatch):
    """A meta.json that names another file - with its true size and sha256 - is refused without reading it."""
    ckpt = _save(tmp_path / "s", 1)
    target = tmp_path / "secret.txt"
    target.write_text("root:x:0:0\n")
    from nanochat_core.common import sha256_file
    entry = {"size": target.stat().st_size, "sha256": sha256_file(target)}
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "model.safetensors").write_text(target.read_text())
    (ckpt / "notes.txt").write_text(target.read_text())
    _rewrite_meta(ckpt, lambda m: m["files"].__setitem__(name, entry))
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    problem = verify_checkpoint(ckpt)
    assert problem and "outside the checkpoint" in problem
    assert not any("passwd" in f or "secret" in f for f in opened)


@pytest.mark.parametrize("garbage", ["[]", '{"files": "x"}', "{not json", ""])
def test_garbage_meta_is_a_reason_not_a_traceback(tmp_path, garbage):
    ckpt = _save(tmp_path / "s", 1)
    (ckpt / "meta.json").write_text(garbage)
    assert verify_checkpoint(ckpt)
    with pytest.raises(NanochatError):
        checkpoint.read_meta(ckpt)
    with pytest.raises(NanochatError):
        load_checkpoint(ckpt, _tiny_net())


def test_load_checkpoint_verifies_hashes(tmp_path):
    """The resume path (training.resume passes a checkpoint it was given) never loads flipped weights."""
    ckpt = _save(tmp_path / "s", 1)
    _flip_last_byte(ckpt / "model.safetensors")
    with pytest.raises(NanochatError, match="does not match its sha256"):
        load_checkpoint(ckpt, _tiny_net())


# -----------------------------------------------------------------------------
# Disk full during a save

def _assert_clean_full_disk(stage_dir, err):
    msg = str(err.value)
    assert "no space left on device" in msg and "\n" not in msg
    assert not [p.name for p in stage_dir.iterdir() if p.name.startswith(".ckpt_")]  # temp dir removed
    assert find_latest(stage_dir).name == "ckpt_000001"                              # previous one intact


def test_disk_full_save_says_so_and_cleans_up(tmp_path, monkeypatch):
    """Writes go to /dev/full: the kernel's real ENOSPC, through torch.save's own file handling."""
    stage = tmp_path / "s"
    _save(stage, 1)
    real_open = builtins.open
    monkeypatch.setattr(checkpoint, "open",
                        lambda f, mode="r", *a, **k: real_open("/dev/full" if "w" in mode else f, mode, *a, **k),
                        raising=False)
    with pytest.raises(NanochatError) as err:
        _save(stage, 2)
    _assert_clean_full_disk(stage, err)


def test_a_full_disk_says_which_checkpoint_is_left_and_never_claims_one_that_is_not_there(tmp_path, monkeypatch):
    real_open = builtins.open
    monkeypatch.setattr(checkpoint, "open",
                        lambda f, mode="r", *a, **k: real_open("/dev/full" if "w" in mode else f, mode, *a, **k),
                        raising=False)
    with pytest.raises(NanochatError) as err:   # the stage's first save: there is nothing before it
        _save(tmp_path / "first", 1)
    assert "no earlier checkpoint" in str(err.value) and "intact" not in str(err.value), err.value
    monkeypatch.undo()
    _save(tmp_path / "s", 1)
    monkeypatch.setattr(checkpoint, "open",
                        lambda f, mode="r", *a, **k: real_open("/dev/full" if "w" in mode else f, mode, *a, **k),
                        raising=False)
    with pytest.raises(NanochatError, match=r"the previous checkpoint \(ckpt_000001\) is intact"):
        _save(tmp_path / "s", 2)


def test_a_checkpoint_file_that_is_a_symlink_is_named_as_one_and_never_read(tmp_path, capsys):
    _save(tmp_path / "s", 1)
    ckpt = _save(tmp_path / "s", 2)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to("/dev/zero")
    assert verify_checkpoint(ckpt) == "model.safetensors is a symbolic link (a checkpoint holds only its own regular files)"
    assert find_latest(tmp_path / "s").name == "ckpt_000001"
    assert "symbolic link" in capsys.readouterr().err
    (ckpt / "model.safetensors").unlink()
    assert verify_checkpoint(ckpt) == "model.safetensors is missing"
    (ckpt / "model.safetensors").mkdir()
    assert verify_checkpoint(ckpt) == "model.safetensors is not a regular file"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_disk_full_on_a_real_tiny_filesystem(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        stage = mnt / "run" / "base"
        _save(stage, 1, nn.Linear(40, 40))                  # ~20 KB weights + ~40 KB optimizer: fits
        with pytest.raises(NanochatError) as err:
            _save(stage, 2, nn.Linear(100, 100))            # ~40 KB + ~80 KB more: does not
        _assert_clean_full_disk(stage, err)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# -----------------------------------------------------------------------------
# A damaged checkpoint through the user's commands: one line, exit 2

@pytest.fixture
def chat_run(tmp_path, tiny_tokenizer):
    from nanochat_core.gpt.model import GPT, config_for_depth
    run = tmp_path / "run"
    tiny_tokenizer.save(run / "tokenizer")
    cfg = config_for_depth(1, tiny_tokenizer.get_vocab_size(), sequence_len=32, head_dim=32)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(run / "sft", 3, model, opt, {"tokenizer_hash": tiny_tokenizer.hash}, 0, 1)
    return run, ckpt, model


def _damage(ckpt, model, how):
    w = ckpt / "model.safetensors"
    if how == "flip_byte":
        _flip_last_byte(w)
    elif how == "truncate_weights":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "garbage_meta":
        (ckpt / "meta.json").write_text("\x00\x01 not json")
    elif how == "mismatched_config":
        # an intact checkpoint (hashes fine) whose config does not describe its weights
        cfg = dict(checkpoint._model_config(model), n_embd=64, n_head=1, n_kv_head=1)
        opt = torch.optim.AdamW(model.parameters())
        save_checkpoint(ckpt.parent, 3, model, opt, {"config": cfg}, 0, 1)
    elif how == "invalid_config":
        _rewrite_meta(ckpt, lambda m: m["config"].update(n_head=0, bogus=1))
    elif how == "bad_tokenizer":
        (ckpt.parent.parent / "tokenizer" / "tokenizer.json").write_text('{"model": 5}')


def _one_line_exit_2(cmd, env_home):
    env = dict(os.environ, NANOCHAT_HOME=str(env_home), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
    return lines[0]


def test_intact_checkpoint_dir_still_chats(chat_run, tmp_path):
    run, ckpt, _ = chat_run
    p = subprocess.run([PY, "-m", "nanochat_cli.main", "chat", "--checkpoint", str(ckpt), "--prompt", "hi",
                        "--max-tokens", "3"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, NANOCHAT_HOME=str(tmp_path / "h"), OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("how", ["flip_byte", "truncate_weights", "garbage_meta", "mismatched_config",
                                 "invalid_config", "bad_tokenizer"])
def test_nanochat_chat_on_a_damaged_checkpoint_dir_is_one_line_exit_2(chat_run, tmp_path, how):
    run, ckpt, model = chat_run
    _damage(ckpt, model, how)
    line = _one_line_exit_2([PY, "-m", "nanochat_cli.main", "chat", "--checkpoint", str(ckpt), "--prompt", "hi"],
                            tmp_path / "h")
    assert str(ckpt) in line or "tokenizer" in line


@pytest.mark.parametrize("entry", [["-m", "nanochat_core.inference.chat", "--prompt", "hi"],
                                   ["-m", "nanochat_core.bench.infer", "--device", "cpu"]])
def test_other_loader_entries_refuse_a_flipped_checkpoint(chat_run, tmp_path, entry):
    run, ckpt, _ = chat_run
    _flip_last_byte(ckpt / "model.safetensors")
    line = _one_line_exit_2([PY, *entry, "--checkpoint", str(ckpt)], tmp_path / "h")
    assert "sha256" in line


def test_serve_refuses_a_flipped_checkpoint_before_listening(chat_run, tmp_path):
    run, ckpt, _ = chat_run
    _flip_last_byte(ckpt / "model.safetensors")
    port = 20000 + uuid.uuid4().int % 20000
    line = _one_line_exit_2([PY, "-m", "nanochat_cli.main", "serve", "--checkpoint", str(ckpt), "--port", str(port)],
                            tmp_path / "h")
    assert "sha256" in line


# -----------------------------------------------------------------------------
# A poisoned optimizer shard (issue 21): a pickle whose __reduce__ runs a command, its hashes recomputed so
# that every size and sha256 check passes. weights_only refuses it; that refusal must be one line, and a
# resume must fall back to the checkpoint before it.

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(ckpt, marker):
    shard = ckpt / "optim_rank000.pt"
    torch.save({"state": {0: _Payload(marker)}, "param_groups": []}, shard)
    _rewrite_meta(ckpt, lambda m: m["files"]["optim_rank000.pt"].update(
        size=shard.stat().st_size, sha256=checkpoint.sha256_file(shard)))


def test_a_poisoned_optimizer_shard_is_one_line_and_the_resume_falls_back(tmp_path, capsys):
    from nanochat_core.training import loop as training
    model = _tiny_net()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "s", 10, model, opt, {"stage": "test"}, 0, 1)
    bad = save_checkpoint(tmp_path / "s", 20, model, opt, {"stage": "test"}, 0, 1)
    marker = tmp_path / "payload-ran"
    _poison(bad, marker)
    assert verify_checkpoint(bad) is None   # every hash matches: only reading it can tell
    with pytest.raises(NanochatError) as e:
        load_checkpoint(bad, _tiny_net(), torch.optim.AdamW(_tiny_net().parameters()))
    assert "optim_rank000.pt cannot be read" in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    meta = training.resume(tmp_path / "s", model, opt, "test")
    assert meta["step"] == 10
    err = capsys.readouterr().err
    assert "ckpt_000020" in err and "falling back" in err and len(err.strip().splitlines()) == 1, err
    # nothing older: one line that says what to do, never a fresh start over a damaged stage
    (tmp_path / "s" / "ckpt_000010" / "meta.json").unlink()
    with pytest.raises(NanochatError, match="no intact checkpoint before it"):
        training.resume(tmp_path / "s", model, opt, "test", ckpt=bad)
    assert not marker.exists()


def test_a_poisoned_shard_through_a_stage_is_one_line_exit_2(tmp_path):
    ckpt = _save(tmp_path / "s", 5)
    _poison(ckpt, tmp_path / "payload-ran")
    code = ("import torch, torch.nn as nn\n"
            "from nanochat_core.common import run_main\n"
            "from nanochat_core.gpt.checkpoint import load_checkpoint\n"
            "def main():\n"
            "    torch.manual_seed(0)\n"
            "    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
            f"    load_checkpoint({str(ckpt)!r}, m, torch.optim.AdamW(m.parameters()))\n"
            "run_main(main)\n")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "cannot be read" in p.stderr
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.parametrize("where", ["meta.json"])
def test_a_deeply_nested_meta_json_is_a_reason_not_a_traceback(tmp_path, where):
    ckpt = _save(tmp_path / "s", 1)
    (ckpt / where).write_text("[" * 100_000 + "]" * 100_000)
    assert "unreadable (RecursionError)" in verify_checkpoint(ckpt)
    with pytest.raises(NanochatError, match="unreadable"):
        checkpoint.read_meta(ckpt)


# -----------------------------------------------------------------------------
# `nanochat eval --checkpoint PATH` evaluates PATH (issue 21): it used to climb to the run dir and evaluate
# the newest intact checkpoint there, so an older one was never the one evaluated and a damaged one was
# silently replaced. The real CLI, the local backend and the real pipeline's eval stage.

def test_eval_of_a_named_older_checkpoint_evaluates_it_and_a_damaged_one_is_refused(tmp_path, tiny_tokenizer):
    from nanochat_core.gpt.model import GPT, config_for_depth
    home = tmp_path / "home"
    run = home / "runs" / "r"
    tiny_tokenizer.save(run / "tokenizer")
    cfg = config_for_depth(1, tiny_tokenizer.get_vocab_size(), sequence_len=32, head_dim=32)
    meta = {"tokenizer_hash": tiny_tokenizer.hash}
    for step in (1, 2):
        torch.manual_seed(step)
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        save_checkpoint(run / "base", step, model, torch.optim.AdamW(model.parameters()), meta, 0, 1)
    older, newest = run / "base" / "ckpt_000001", run / "base" / "ckpt_000002"
    env = dict(os.environ, NANOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    p = subprocess.run([PY, "-m", "nanochat_cli.main", "eval", "--local", "--checkpoint", str(older), "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads((run / "eval" / "base.json").read_text())
    assert record["checkpoint"] == str(older) and "bpb" in record["metrics"]
    assert "base/ckpt_000001" in (run / "pipeline.log").read_text()

    _flip_last_byte(older / "model.safetensors")
    line = _one_line_exit_2([PY, "-m", "nanochat_cli.main", "eval", "--local", "--checkpoint", str(older)], home)
    assert str(older) in line and "corrupt" in line and "sha256" in line
    assert json.loads((run / "eval" / "base.json").read_text()) == record   # nothing else was evaluated instead
    line = _one_line_exit_2([PY, "-m", "nanochat_cli.main", "eval", "--local", "--checkpoint",
                             str(run / "base" / "ckpt_000007")], home)
    assert "ckpt_000007 does not exist" in line
    assert newest.is_dir()
