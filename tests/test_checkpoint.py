"""Checkpoints (save / verify / fall back / load) and the reusable training pieces (schedules, stop guard,
bits per byte). Multi-process and kill -9 behaviour is tested through base_train in test_base_train.py."""
import json
import math
import os
import random
import signal
import time

import pytest
import torch
import torch.nn as nn

from nanochat_core.gpt import checkpoint
from nanochat_core.training import loop as training
from nanochat_core.gpt.checkpoint import find_latest, load_checkpoint, save_checkpoint


def _tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _train_a_bit(model, opt, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _save(stage, step, model, opt, **kw):
    return save_checkpoint(stage, step, model, opt, {"stage": "test", "tokenizer_hash": "abc"}, 0, 1,
                           loader_state={"pos": step}, **kw)


def test_roundtrip_weights_optimizer_meta(tmp_path):
    model = _tiny_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_a_bit(model, opt)
    path = _save(tmp_path / "base", 7, model, opt)
    assert path.name == "ckpt_000007"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optim_rank000.pt"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["world_size"] == 1 and meta["tokenizer_hash"] == "abc"
    assert meta["loader_states"] == [{"pos": 7}]
    assert set(meta["files"]) == {"model.safetensors", "optim_rank000.pt"}
    assert meta["files"]["model.safetensors"]["size"] == (path / "model.safetensors").stat().st_size

    model2 = _tiny_net(seed=123)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    meta2 = load_checkpoint(path, model2, opt2)
    assert meta2["step"] == 7
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # the restored optimizer continues exactly like the original
    _train_a_bit(model, opt, steps=2, seed=9)
    _train_a_bit(model2, opt2, steps=2, seed=9)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # no temp dirs left behind
    assert [p.name for p in (tmp_path / "base").iterdir()] == ["ckpt_000007"]


def test_keeps_last_k_and_finds_latest(tmp_path):
    model = _tiny_net()
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path / "s", step, model, opt, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "s")] == [5, 4]
    assert find_latest(tmp_path / "s").name == "ckpt_000005"
    assert find_latest(tmp_path / "nothing_here") is None


@pytest.mark.parametrize("damage", ["truncate_model", "truncate_optim", "flip_byte", "no_meta", "bad_meta"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, capsys, damage):
    model = _tiny_net()
    opt = torch.optim.AdamW(model.parameters())
    _train_a_bit(model, opt)
    _save(tmp_path / "s", 10, model, opt)
    _save(tmp_path / "s", 20, model, opt)
    bad = tmp_path / "s" / "ckpt_000020"
    if damage == "truncate_model":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "truncate_optim":
        with open(bad / "optim_rank000.pt", "r+b") as f:
            f.truncate(10)
    elif damage == "flip_byte":
        data = bytearray((bad / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (bad / "model.safetensors").write_bytes(bytes(data))
    elif damage == "no_meta":
        (bad / "meta.json").unlink()
    else:
        (bad / "meta.json").write_text("{not json")
    capsys.readouterr()
    assert find_latest(tmp_path / "s").name == "ckpt_000010"
    err = capsys.readouterr().err
    assert "ckpt_000020" in err and "corrupt" in err


def test_interrupted_save_leaves_no_checkpoint(tmp_path):
    """A save that dies half-way (here: the optimizer cannot be serialised) never creates the final name,
    and the previous checkpoint stays the latest."""
    model = _tiny_net()
    opt = torch.optim.AdamW(model.parameters())
    _save(tmp_path / "s", 1, model, opt)

    class Exploding:
        def state_dict(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        _save(tmp_path / "s", 2, model, Exploding())
    assert not (tmp_path / "s" / "ckpt_000002").exists()
    assert find_latest(tmp_path / "s").name == "ckpt_000001"
    _save(tmp_path / "s", 3, model, opt)  # the next save cleans up the leftover temp dir
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["ckpt_000001", "ckpt_000003"]


def test_pruning_never_deletes_the_checkpoint_it_just_wrote(tmp_path, capsys):
    """Step dirs after the one being saved (an abandoned attempt's: unfinished, or corrupt, which is why the run
    resumed from an earlier one) never push the new checkpoint out of the `keep` newest; they are removed."""
    model = _tiny_net()
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        _save(tmp_path / "s", step, model, opt, keep=2)
    for step in (7, 8, 9):
        bad = tmp_path / "s" / f"ckpt_{step:06d}"
        bad.mkdir()
        (bad / "optim_rank000.pt").write_bytes(b"half a shard")
        if step == 9:
            (bad / "meta.json").write_text("{not json")
    assert find_latest(tmp_path / "s").name == "ckpt_000002"
    _save(tmp_path / "s", 3, model, opt, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "s")] == [3, 2]
    assert find_latest(tmp_path / "s").name == "ckpt_000003"


def test_rng_state_roundtrip():
    random.seed(5)
    torch.manual_seed(5)
    state = json.loads(json.dumps(checkpoint.capture_rng_state()))  # must survive JSON
    a = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    checkpoint.restore_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_lr_schedule_shape():
    total, warm = 100, 5
    m = [training.lr_multiplier(s, total, warm) for s in range(total)]
    assert m[0] == pytest.approx(1 / warm) and m[warm - 1] == 1.0
    assert all(x == 1.0 for x in m[warm:36])            # constant until warmdown starts (last 65%)
    assert all(a > b for a, b in zip(m[35:], m[36:]))  # strictly decreasing warmdown ...
    assert m[-1] == pytest.approx(1 / 65 + (64 / 65) * 0.05)   # ... towards 5% of the peak, not 0
    assert training.muon_momentum(0) == 0.85
    assert training.muon_momentum(200) == pytest.approx(0.91)
    assert training.muon_momentum(400) == training.muon_momentum(5000) == pytest.approx(0.97)
    # given the progress, momentum eases to 0.90 over the warmdown (which starts at 35% of the run)
    assert training.muon_momentum(5000, progress=0.35) == pytest.approx(0.97)
    assert training.muon_momentum(5000, progress=0.675) == pytest.approx(0.935)
    assert training.muon_momentum(5000, progress=1.0) == pytest.approx(0.90)


def test_apply_schedule_sets_lr_from_initial():
    model = _tiny_net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    training.remember_initial_lr(opt)
    training.apply_schedule(opt, 0.25)
    training.apply_schedule(opt, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_stop_guard_real_sigterm_and_deadline(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DEADLINE", raising=False)
    guard = training.StopGuard(deadline_s=None)
    try:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.reason() == "SIGTERM" and guard.exit_code() == 0
    finally:
        guard.restore()
    set_at = time.time()
    monkeypatch.setenv("NANOCHAT_DEADLINE", str(set_at + 0.5))
    guard = training.StopGuard(deadline_s=3600, est_save_s=0.0)
    try:
        assert guard.deadline == pytest.approx(set_at + 0.5, abs=1e-3)   # the environment's, not the hour
        assert guard.should_stop()  # margin (>= 1 s) already reaches past a 0.5 s deadline
        assert guard.reason() == "deadline"
    finally:
        guard.restore()
    monkeypatch.setenv("NANOCHAT_DEADLINE", "soon")
    with pytest.raises(training.NanochatError):
        training.StopGuard()


def test_save_cadence():
    c = training.SaveCadence(minutes=0, steps=3)
    assert [s for s in range(1, 10) if c.due(s)] == [3, 6, 9]
    c = training.SaveCadence(minutes=1e-6)
    time.sleep(0.01)
    assert c.due(1)
    c.saved()
    assert not training.SaveCadence(minutes=10).due(1)


def test_evaluate_bpb_matches_hand_computation():
    torch.manual_seed(0)
    V = 11

    class Uniformish(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, V)

        def forward(self, x, y=None, loss_reduction="mean"):
            logits = self.emb(x)
            return nn.functional.cross_entropy(logits.view(-1, V), y.reshape(-1), ignore_index=-1,
                                               reduction=loss_reduction)

    model = Uniformish()
    token_bytes = torch.tensor([0, 1, 2, 3, 1, 1, 2, 4, 1, 1, 3], dtype=torch.int32)  # id 0 = a special
    x = torch.randint(0, V, (2, 6))
    y = torch.randint(0, V, (2, 6))
    y[0, 0] = -1
    y[1, 1] = 0
    bpb = training.evaluate_bpb(model, iter([(x, y)]), 1, token_bytes, "cpu")
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model.emb(x).view(-1, V), y.view(-1).clamp(min=0), reduction="none")
    nats = bytes_ = 0.0
    for l, t in zip(losses.tolist(), y.view(-1).tolist()):
        if t >= 0 and token_bytes[t] > 0:
            nats += l
            bytes_ += int(token_bytes[t])
    assert bpb == pytest.approx(nats / (math.log(2) * bytes_), rel=1e-6)


def test_load_model_from_run_dir(tmp_path, tiny_tokenizer):
    from tiny_models import noisy_tiny_model
    run = tmp_path / "run"
    tiny_tokenizer.save(run / "tokenizer")
    model = noisy_tiny_model(tiny_tokenizer, 0.01)
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters())
    meta = {"tokenizer_hash": tiny_tokenizer.hash}
    save_checkpoint(run / "base", 5, model, opt, meta, 0, 1)
    save_checkpoint(run / "sft", 2, model, opt, meta, 0, 1)
    loaded, tok, meta = checkpoint.load_model(run, "cpu")
    assert meta["path"].endswith("sft/ckpt_000002") and not loaded.training
    assert tok.hash == tiny_tokenizer.hash
    idx = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    _, _, meta = checkpoint.load_model(run, "cpu", stage="base")
    assert meta["step"] == 5
    _, _, meta = checkpoint.load_model(run / "base" / "ckpt_000005", "cpu")
    assert meta["step"] == 5
    with pytest.raises(checkpoint.NanochatError, match="no complete checkpoint"):
        checkpoint.load_model(run, "cpu", stage="rl")
