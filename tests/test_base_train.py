"""base_train as a user (and the budget guard, and a spot preemption) sees it: real subprocesses, real
signals, real torchrun with 2 gloo processes. Tiny configs (depth 1, vocab 512, seq 64, fp32, 1 thread)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nanochat_core.gpt.checkpoint import find_latest, list_checkpoints, read_meta
from nanochat_core.common import NanochatError, parse_event

PY = sys.executable
TINY = ["--depth", "1", "--head-dim", "32", "--seq-len", "64", "--device-batch-size", "4", "--log-every", "1",
        "--device", "cpu", "--save-every-minutes", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from nanochat_core.data.dataset import ensure_bundled
    d = tmp_path_factory.mktemp("data")
    ensure_bundled(d)
    return d


@pytest.fixture
def run(tmp_path, tiny_tokenizer):
    run_dir = tmp_path / "run"
    tiny_tokenizer.save(run_dir / "tokenizer")
    return run_dir


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("NANOCHAT_DEADLINE", None)
    return env


def _cmd(run, data, *extra, launcher=(PY, "-m")):
    return [*launcher, "nanochat_core.stages.base_train", "--run-dir", str(run), "--data", str(data), *TINY, *extra]


def _train(run, data, *extra, launcher=(PY, "-m"), timeout=120):
    p = subprocess.run(_cmd(run, data, *extra, launcher=launcher), capture_output=True, text=True,
                       env=_env(), timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _events(stdout, name):
    return [e for e in map(parse_event, stdout.splitlines()) if e and e["event"] == name]


def _losses(stdout):
    return {e["step"]: e["loss"] for e in _events(stdout, "progress")}


def _torchrun(n=2):
    return (PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m")


@pytest.mark.slow
def test_kill9_then_restart_continues_bit_for_bit(run, data_dir, tmp_path):
    steps = ["--steps", "60", "--save-every-steps", "4"]
    ref_run = tmp_path / "ref"
    shutil.copytree(run / "tokenizer", ref_run / "tokenizer")
    ref = _train(ref_run, data_dir, *steps)
    ref_losses = _losses(ref.stdout)
    assert sorted(ref_losses) == list(range(1, 61))

    # the same run, killed with SIGKILL as soon as its second checkpoint is on disk
    proc = subprocess.Popen(_cmd(run, data_dir, *steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    for line in proc.stdout:
        e = parse_event(line)
        if e and e["event"] == "checkpoint" and e["step"] >= 8:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = list_checkpoints(run / "base")[0][0]
    assert 8 <= last < 60, "the kill must land in the middle of the run"

    again = _train(run, data_dir, *steps)
    resumed = _events(again.stdout, "resumed")
    assert [e["step"] for e in resumed] == [last] and f"resumed from step {last}" in again.stdout
    losses = _losses(again.stdout)
    assert sorted(losses) == list(range(last + 1, 61))
    assert all(losses[s] == ref_losses[s] for s in losses), "losses after resume must equal the uninterrupted run's"
    a, b = read_meta(find_latest(run / "base")), read_meta(find_latest(ref_run / "base"))
    assert a["step"] == b["step"] == 60
    assert a["files"]["model.safetensors"]["sha256"] == b["files"]["model.safetensors"]["sha256"]


def test_sigterm_saves_a_checkpoint_and_exits_zero(run, data_dir):
    proc = subprocess.Popen(_cmd(run, data_dir, "--steps", "100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    out = []
    for line in proc.stdout:
        out.append(line)
        e = parse_event(line)
        if e and e["event"] == "progress" and e["step"] >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=60)
    stdout = "".join(out) + rest
    assert proc.returncode == 0, err
    saved = _events(stdout, "checkpoint")
    assert len(saved) == 1 and saved[0]["step"] >= 3
    assert "SIGTERM" in stdout and "stopped at step" in stdout
    assert find_latest(run / "base").name == f"ckpt_{saved[0]['step']:06d}"
    assert not _events(stdout, "stage_end")  # not finished: the next start resumes
    # ...and its end record says so, which is what the pipeline records (or not) in stages.json
    end = json.loads((run / "base" / "end.json").read_text())
    assert end == {"step": saved[0]["step"], "finished": False, "checkpoint_step": saved[0]["step"],
                   "stopped_by": "SIGTERM"}
    from nanochat_core.stages.pipeline import stage_verdict
    assert stage_verdict(run, "base")[0] == "unfinished"


def test_deadline_stops_and_saves(run, data_dir):
    """Outcomes only (a busy machine may reach the deadline before the first step): it stops at the deadline,
    saves, shows a sample, does not call itself finished, and its end record says why it stopped. *When* the
    guard fires is test_stop_guard_fires_at_the_deadline_less_its_margin's, on an injected clock."""
    p = _train(run, data_dir, "--steps", "100000", "--deadline", "12")
    assert "stopped at step" in p.stdout and "(deadline)" in p.stdout
    saved = _events(p.stdout, "checkpoint")[0]
    step = saved["step"]
    assert step >= 1 and find_latest(run / "base").name == f"ckpt_{step:06d}"
    assert _events(p.stdout, "sample") and not _events(p.stdout, "stage_end")
    end = json.loads((run / "base" / "end.json").read_text())
    assert end == {"step": step, "finished": False, "checkpoint_step": step, "stopped_by": "deadline"}


def test_stop_guard_fires_at_the_deadline_less_its_margin(monkeypatch):
    """The guard stops early enough to save: at deadline - (3 typical steps + 1.5 saves + 1 s), judged on its
    clock (injected here), with a slow first step (compile) ignored and one slow outlier damped."""
    from nanochat_core.training.loop import StopGuard
    now = [1000.0]
    monkeypatch.setenv("NANOCHAT_DEADLINE", "1100")
    guard = StopGuard(clock=lambda: now[0])
    try:
        assert guard.deadline == 1100
        for seconds in (30.0, 2.0, 2.0, 2.0):       # compile, then a steady 2 s
            guard.note_step(seconds)
        guard.note_save(4.0)
        assert guard.margin() == pytest.approx(3 * 2.0 + 1.5 * 4.0 + 1.0)
        now[0] = 1100 - 13.01
        assert not guard.should_stop()
        now[0] = 1100 - 13.0
        assert guard.should_stop() and guard.reason() == "deadline" and guard.exit_code() == 0
        guard.note_step(12.0)                        # one slow outlier moves the stop earlier, not 3 x 12 s
        assert guard.margin() == pytest.approx(3 * (0.8 * 2.0 + 0.2 * 12.0) + 1.5 * 4.0 + 1.0)
    finally:
        guard.restore()


def test_env_deadline_in_the_past_saves_immediately(run, data_dir):
    env = dict(_env(), NANOCHAT_DEADLINE=str(time.time() - 1))
    p = subprocess.run(_cmd(run, data_dir, "--steps", "100000"), capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert [e["step"] for e in _events(p.stdout, "checkpoint")] == [1]


def test_truncated_checkpoint_falls_back_to_previous(run, data_dir):
    _train(run, data_dir, "--steps", "8", "--save-every-steps", "4")
    from nanochat_core.stages.pipeline import stage_verdict
    assert json.loads((run / "base" / "end.json").read_text())["finished"]   # a run that did its 8 steps
    assert stage_verdict(run, "base") == ("finished", "")
    latest = run / "base" / "ckpt_000008"
    with open(latest / "optim_rank000.pt", "r+b") as f:
        f.truncate(100)
    p = _train(run, data_dir, "--steps", "8", "--save-every-steps", "4")
    assert "ckpt_000008 is corrupt" in p.stderr
    assert "resumed from step 4" in p.stdout
    assert sorted(_losses(p.stdout)) == [5, 6, 7, 8]
    assert find_latest(run / "base") == latest  # re-saved, intact again


@pytest.mark.slow
def test_resume_on_two_ranks_from_one_rank_checkpoint(run, data_dir):
    flags = ["--steps", "8", "--save-every-steps", "4", "--total-batch-size", "512"]
    one = _train(run, data_dir, *flags)  # 1 rank: 4 rows x 64 tokens, 2 accumulation steps
    ref_losses = _losses(one.stdout)
    shutil.rmtree(run / "base" / "ckpt_000008")  # as if the 1-rank run had stopped at step 4
    two = _train(run, data_dir, *flags, launcher=_torchrun(2))
    assert "resumed from step 4" in two.stdout
    losses = _losses(two.stdout)
    assert sorted(losses) == [5, 6, 7, 8]
    # other data order on 2 ranks, so not identical - but the same model continuing, not a fresh start
    assert all(abs(losses[s] - ref_losses[s]) < 0.5 for s in losses), (losses, ref_losses)
    meta = read_meta(find_latest(run / "base"))
    assert meta["step"] == 8 and meta["world_size"] == 2
    assert sorted(f for f in meta["files"] if f.startswith("optim")) == ["optim_rank000.pt", "optim_rank001.pt"]
    assert len(meta["loader_states"]) == 2


EQUIV_SCRIPT = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    from nanochat_core.training import loop as training
    from nanochat_core.common import init_runtime
    from nanochat_core.gpt.model import GPT, config_for_depth
    rt = init_runtime("cpu")
    torch.manual_seed(0)
    model = GPT.build(config_for_depth(2, 512, sequence_len=32, head_dim=32), "cpu")
    opt = model.setup_optimizer(weight_decay=0.1)
    training.remember_initial_lr(opt)
    g = torch.Generator().manual_seed(1)
    rows_per_rank = 4 // rt.world_size
    batch = torch.randint(0, 512, (4, 33), generator=g)               # the same global batch everywhere
    for step in range(6):
        mine = batch[rt.rank * rows_per_rank:(rt.rank + 1) * rows_per_rank]
        micro = iter([(mine[i:i + 2, :-1], mine[i:i + 2, 1:]) for i in range(0, rows_per_rank, 2)])
        training.apply_schedule(opt, training.lr_multiplier(step, 6, 1), training.muon_momentum(step))
        loss = training.forward_backward(model, micro, rows_per_rank // 2, "cpu")
        opt.step(); model.zero_grad(set_to_none=True)
        if rt.ddp:
            dist.all_reduce(loss); loss /= rt.world_size
        if rt.rank == 0:
            print("LOSS", step, repr(loss.item()), flush=True)
    if rt.rank == 0:
        print("WEIGHTS", repr(sum(p.double().square().sum().item() for p in model.parameters())), flush=True)
''')


@pytest.mark.slow
def test_two_processes_match_one_process_with_same_global_batch(tmp_path):
    script = tmp_path / "equiv.py"
    script.write_text(EQUIV_SCRIPT)
    outs = []
    for launcher in ([PY], [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]):
        p = subprocess.run([*launcher, str(script)], capture_output=True, text=True, env=_env(), timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append({l.split()[1] if l.startswith("LOSS") else "w": float(l.split()[-1])
                     for l in p.stdout.splitlines() if l.startswith(("LOSS", "WEIGHTS"))})
    one, two = outs
    assert len(one) == len(two) == 7
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-4), (k, one[k], two[k])
    assert one["5"] < one["0"] - 0.5  # and it did learn (the one batch it sees over and over)


def test_minutes_horizon_ends_its_schedule_and_says_whether_it_finished(run, data_dir):
    """Outcomes only: how many steps fit depends on the machine (test_time_horizon_* drive the clock)."""
    p = _train(run, data_dir, "--minutes", "0.25", "--compile", "off")  # (compiling alone would take ~20 s)
    assert _events(p.stdout, "stage_end")           # its horizon ran out: finished, not stopped
    end = json.loads((run / "base" / "end.json").read_text())
    progress = _events(p.stdout, "progress")
    if progress:   # it trained: the last step is where the schedule ended, saved with the plan's horizon
        assert progress[-1]["step"] == progress[-1]["total_steps"] == end["step"] and end["finished"]
        plan = read_meta(find_latest(run / "base"))["plan"]
        assert plan["horizon"] == "--minutes 0.25" and 0 <= plan["time_budget_s"] <= 15
    else:          # a machine so busy that start-up ate the quarter minute: not finished, and it says so
        assert end == {"step": 0, "finished": False, "checkpoint_step": None, "stopped_by": None}


def _time_horizon_run(budget_s, planned_steps, pace):
    """A time-bounded run on an injected clock: pace(step) is the seconds step `step` takes. Returns the LR
    multipliers of its steps, as base_train applies them."""
    from nanochat_core.training import loop as training
    now = [0.0]
    horizon = training.TimeHorizon(budget_s, clock=lambda: now[0])
    warmup = min(40, max(1, planned_steps // 50))
    mults, step = [], 0
    while not horizon.done():
        mults.append(training.lr_multiplier_at(horizon.progress(), step, warmup))
        now[0] += pace(step)
        step += 1
        horizon.note_step(pace(step - 1))
    return mults


def test_time_horizon_whose_throughput_drops_still_ends_its_schedule_at_the_deadline():
    """10 s of training timed at 0.05 s/step (200 planned); from step 6 on every step takes 0.1 s longer (a
    machine that got busy after the timing). Far fewer steps, yet the schedule runs to its end: the last step
    is at the bottom of the warmdown (a fixed-step schedule would stop at the deadline with the LR at ~1)."""
    mults = _time_horizon_run(10.0, 200, lambda step: 0.05 if step < 6 else 0.15)
    assert len(mults) < 200 / 2
    assert mults[-1] < 0.25 and max(mults) == 1.0
    assert mults[-1] == min(mults[mults.index(1.0):]), mults
    # and the same budget at a steady pace ends at the bottom of the warmdown too, with the steps it planned
    steady = _time_horizon_run(10.0, 200, lambda step: 0.05)
    assert len(steady) == pytest.approx(200, abs=2) and steady[-1] < 0.1


def test_user_errors_are_one_line(tmp_path, data_dir):
    p = subprocess.run(_cmd(tmp_path / "empty", data_dir, "--steps", "2"), capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    from nanochat_core.stages.base_train import fit_device_batch, parse_args
    with pytest.raises(NanochatError, match="--depth must be >= 1"):
        parse_args(["--run-dir", "x", "--depth", "0"])
    with pytest.raises(NanochatError, match="does not divide the total batch"):
        fit_device_batch(512, 3, 64, 1, explicit=True)
    assert fit_device_batch(512, 3, 64, 1, explicit=False) == 2


def test_bench_train_prints_one_json_line():
    p = subprocess.run([PY, "-m", "nanochat_core.bench", "train", "--depth", "1", "--head-dim", "32",
                        "--seq-len", "64", "--device-batch-size", "2", "--vocab-size", "512", "--steps", "3"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    assert len(rows) == 1
    r = rows[0]
    assert r["depth"] == 1 and r["device_batch_size"] == 2 and r["tokens_per_sec"] > 0
    assert 0 < r["mfu_datasheet"] and r["peak_memory_gb"] >= 0 and r["device"] == "cpu"


@pytest.mark.slow
def test_compiled_step_matches_eager_over_20_steps():
    """The fast path (torch.compile of the model, what CUDA runs by default) against eager, on CPU in fp32:
    the same 20 training steps give the same losses up to float reassociation. (On a GPU the same check
    in bf16 belongs to the benchmark issue; this is the CPU smoke test of the path.)"""
    import torch
    from nanochat_core.training import loop as training
    from nanochat_core.gpt.model import GPT, config_for_depth

    def losses(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        model = GPT.build(config_for_depth(1, 512, sequence_len=64, head_dim=32), "cpu")
        opt = model.setup_optimizer()
        training.remember_initial_lr(opt)
        fwd = torch.compile(model, dynamic=False) if compiled else model
        data = torch.randint(0, 512, (8, 65), generator=torch.Generator().manual_seed(1))
        out = []
        for step in range(20):
            x = data[(step % 2) * 4:(step % 2) * 4 + 4]
            training.apply_schedule(opt, training.lr_multiplier(step, 20, 2), training.muon_momentum(step))
            out.append(training.forward_backward(fwd, iter([(x[:, :-1], x[:, 1:])]), 1, "cpu").item())
            opt.step()
            model.zero_grad(set_to_none=True)
        return out

    try:
        eager, compiled = losses(False), losses(True)
    finally:
        torch._dynamo.reset()
    assert compiled[0] == pytest.approx(eager[0], abs=1e-5)
    # reassociation differences grow as training goes on (a chaotic system: the first 10 steps agreed to 2e-3 on
    # the machine this was written on and to 2.54e-3 on another - how the generated kernels group their sums
    # differs between CPUs -, the last ones drift to ~3e-2 since MuonEq rescales quiet rows, rounding included);
    # a wrong compiled graph would be off at the first step, or by whole units, so 1e-2 still catches it
    assert all(abs(a - b) < 1e-2 for a, b in zip(eager[:10], compiled[:10])), str([a - b for a, b in zip(eager, compiled)])
    assert all(abs(a - b) < 6e-2 for a, b in zip(eager, compiled)), str([round(a - b, 4) for a, b in zip(eager, compiled)])
    assert eager[-1] < eager[0] - 3  # it learned the two batches: the comparison is not of two flat lines
