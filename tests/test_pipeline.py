"""The pipeline's launch topology and the trainer's per-GPU presets: pure functions, checked for the
properties the rest of the system relies on."""
import json
import sys

import pytest
from typer.testing import CliRunner

from nanochat_core.common import NanochatError
from nanochat_core.training.loop import preset_device_batch
from nanochat_core.stages.pipeline import launcher, parse_args, stage_commands

CARDS_GB = [16, 24, 40, 48, 80, 141]   # the card classes issue 3 names, plus a small and a 48 GB one


def test_presets_shrink_with_depth_and_grow_with_memory():
    for T in (1024, 2048, 4096):
        for gb in CARDS_GB:
            rows = [preset_device_batch(d, T, "cuda", gb) for d in range(4, 33, 2)]
            assert all(r >= 1 for r in rows)
            assert rows == sorted(rows, reverse=True), (gb, T, rows)   # deeper never gets more rows
        for d in (12, 20, 24, 26):
            by_mem = [preset_device_batch(d, T, "cuda", gb) for gb in CARDS_GB]
            assert by_mem == sorted(by_mem), (d, T, by_mem)            # more memory never gets fewer rows
    # tokens per micro-step do not depend on the sequence length (rows scale by 2048/T)
    assert preset_device_batch(20, 1024, "cuda", 80) == 2 * preset_device_batch(20, 2048, "cuda", 80)
    # CPU: ~2K tokens per micro-step, whatever "memory" says
    assert preset_device_batch(4, 256, "cpu", None) * 256 == 2048


def test_single_gpu_runs_in_process_and_several_use_torchrun():
    assert launcher(1, 1) == [sys.executable]
    cmd = launcher(8, 1)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=8"] and "--standalone" in cmd


def test_multi_node_rendezvous_comes_from_skypilot_env(monkeypatch):
    monkeypatch.setenv("SKYPILOT_NODE_IPS", "10.0.0.5\n10.0.0.6")
    monkeypatch.setenv("SKYPILOT_NODE_RANK", "1")
    cmd = launcher(8, 2)
    assert "--nnodes=2" in cmd and "--node_rank=1" in cmd and "--master_addr=10.0.0.5" in cmd
    assert "--standalone" not in cmd
    monkeypatch.delenv("SKYPILOT_NODE_IPS")
    with pytest.raises(NanochatError, match="SKYPILOT_NODE_IPS"):
        launcher(8, 2)


def test_cloud_preset_runs_every_chat_stage_eval_and_the_local_preset_stays_offline_and_small(tmp_path):
    a = parse_args(["--run-dir", str(tmp_path / "r"), "--preset", "cloud", "--depth", "20"])
    (base,) = stage_commands("base", a, tmp_path, [sys.executable])
    assert base[base.index("--depth") + 1] == "20"
    evals = stage_commands("eval", a, tmp_path, [sys.executable])
    assert [c[c.index("-m") + 1] for c in evals] == ["nanochat_core.stages.base_eval", "nanochat_core.stages.chat_eval"]
    assert "--stage" in evals[1] and evals[1][evals[1].index("--stage") + 1] == "all"
    a = parse_args(["--run-dir", str(tmp_path / "r")])
    (tok,) = stage_commands("tok", a, tmp_path, [sys.executable])
    assert tok[tok.index("--vocab-size") + 1] == "4096"
    (sft,) = stage_commands("sft", a, tmp_path, [sys.executable])
    assert "--source" in sft and sft[sft.index("--source") + 1] == "local"


def test_a_named_eval_checkpoint_is_the_only_one_evaluated(tmp_path):
    run = tmp_path / "r"
    a = parse_args(["--run-dir", str(run), "--eval-checkpoint", "base/ckpt_000001"])
    (cmd,) = stage_commands("eval", a, tmp_path, [sys.executable])
    assert cmd[cmd.index("-m") + 1] == "nanochat_core.stages.base_eval"
    assert cmd[cmd.index("--checkpoint") + 1] == str(run.resolve() / "base" / "ckpt_000001")
    a = parse_args(["--run-dir", str(run), "--eval-checkpoint", "sft"])
    (cmd,) = stage_commands("eval", a, tmp_path, [sys.executable])
    assert cmd[cmd.index("-m") + 1] == "nanochat_core.stages.chat_eval" and cmd[cmd.index("--stage") + 1] == "sft"
    for bad in ("/etc", "../other/base", "tokenizer"):
        with pytest.raises(NanochatError, match="name a checkpoint inside the run dir"):
            parse_args(["--run-dir", str(run), "--eval-checkpoint", bad])


def test_eval_dtype_reaches_every_evaluation_and_only_when_asked(tmp_path):
    """`nanochat eval --dtype` arrives as --eval-dtype (the node's too, in its arguments): every evaluation the
    eval stage runs - your data's included - loads those weights; without it, none is told anything."""
    from nanochat_core.data.user_data import Bundle
    run = tmp_path / "r"
    for argv, want in (([], None), (["--eval-dtype", "int8"], "int8")):
        a = parse_args(["--run-dir", str(run)] + argv)
        a.user_data = tmp_path
        a.bundle = Bundle(tmp_path, "0" * 64, {"docs": {"files": 1}, "chat": {"file": "c.jsonl"}})
        cmds = stage_commands("eval", a, tmp_path, [sys.executable])
        assert len(cmds) == 5   # base, chat, your documents at base and after SFT, your held-out questions
        for cmd in cmds:
            assert (cmd[cmd.index("--dtype") + 1] if "--dtype" in cmd else None) == want, cmd


def test_local_dryrun_plan_counts_the_model_the_local_preset_trains():
    import torch
    from nanochat_cli.main import app
    from nanochat_core.gpt.model import GPT, config_for_depth
    r = CliRunner().invoke(app, ["train", "--local", "--dryrun", "--json"])
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    with torch.device("meta"):
        model = GPT(config_for_depth(4, 4096, sequence_len=256, head_dim=64))
    assert plan["params"] == sum(p.numel() for p in model.parameters())
    # --preflight-only (and --stages) plan the stages that run, and only those
    r = CliRunner().invoke(app, ["train", "--local", "--preflight-only", "--dryrun", "--json"])
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert [s["name"] for s in plan["stages"]] == ["preflight"] and plan["hours"] == plan["stages"][0]["hours"]


# -----------------------------------------------------------------------------
# The embedded default trains a fixed amount, and a stage is done only when it finished its work

def test_the_local_preset_trains_a_fixed_number_of_steps_never_a_clock_horizon(tmp_path):
    """The same command must give the same model on a busy machine as on an idle one: no `--minutes` anywhere
    in the local preset's training stages unless the user asked for a time-bounded base."""
    from nanochat_core.stages.pipeline import LOCAL_BASE_STEPS, LOCAL_POST_STEPS
    a = parse_args(["--run-dir", str(tmp_path / "r")])
    for stage, steps in (("base", LOCAL_BASE_STEPS), ("sft", LOCAL_POST_STEPS), ("mid", LOCAL_POST_STEPS)):
        (cmd,) = stage_commands(stage, a, tmp_path, [sys.executable])
        assert "--minutes" not in cmd and cmd[cmd.index("--steps") + 1] == str(steps), (stage, cmd)
    # --steps is every local training stage's (a smoke run is short throughout; README and --help say so)
    a = parse_args(["--run-dir", str(tmp_path / "r"), "--steps", "7"])
    for stage in ("base", "sft"):
        (cmd,) = stage_commands(stage, a, tmp_path, [sys.executable])
        assert cmd[cmd.index("--steps") + 1] == "7"
    # --minutes asks for a time-bounded base on purpose; post-training stays fixed
    a = parse_args(["--run-dir", str(tmp_path / "r"), "--minutes", "3"])
    (base,) = stage_commands("base", a, tmp_path, [sys.executable])
    (sft,) = stage_commands("sft", a, tmp_path, [sys.executable])
    assert float(base[base.index("--minutes") + 1]) == 3 and "--minutes" not in sft


def test_cpu_compiles_only_where_it_pays_for_itself_decided_from_the_plan():
    from nanochat_core.gpt.model_config import config_for_depth
    from nanochat_core.stages.base_train import compile_pays_on_cpu
    import dataclasses

    def plan(depth, vocab, T, head_dim, steps, batch, horizon=None):
        c = dataclasses.asdict(config_for_depth(depth, vocab, sequence_len=T, head_dim=head_dim))
        return {"config": c, "total_steps": steps, "total_batch_size": batch, "horizon": horizon or f"--steps {steps}"}
    assert compile_pays_on_cpu(plan(4, 4096, 256, 64, 200, 2048))            # the local preset
    assert not compile_pays_on_cpu(plan(4, 4096, 256, 64, 5, 2048))          # a smoke run: compiling costs more
    assert not compile_pays_on_cpu(plan(1, 512, 64, 32, 100000, 256))        # overhead-bound tiny test model
    assert compile_pays_on_cpu(plan(4, 4096, 256, 64, None, 2048, "--minutes 2"))


def _standin_pipeline(run_dir, env, *args):
    """The real Pipeline with stand-in stage processes (tests/stage_standins.py)."""
    import os
    import subprocess
    from pathlib import Path
    from nanochat_core.common import parse_event
    here = Path(__file__).resolve().parent
    full = dict(os.environ, PYTHONPATH=f"{here.parent}{os.pathsep}{here}", **env)
    for k in ("NANOCHAT_DEADLINE", "STANDIN_LOG"):
        full.pop(k, None)
    r = subprocess.run([sys.executable, str(here / "stage_standins.py"), "pipeline", "--run-dir", str(run_dir),
                        "--preset", "local", "--stages", "tok,base,sft,report", *args],
                       capture_output=True, text=True, env=full, timeout=120)
    return r, [e for e in map(parse_event, r.stdout.splitlines()) if e]


@pytest.mark.parametrize("base,said", [("sigterm:300:46", "stopped by SIGTERM at step 46"),
                                       ("nothing", "trained 0 steps and saved no checkpoint")])
def test_a_stage_that_did_not_finish_its_work_is_not_done_and_the_same_command_resumes_it(tmp_path, base, said):
    """A SIGTERM that reached base alone (it saves and exits 0, as designed) or a base that trained 0 steps
    used to be recorded done: the run 'succeeded', SFT failed for want of a checkpoint, and every rerun
    skipped base and failed the same way."""
    rd = tmp_path / "run"
    r, events = _standin_pipeline(rd, {"STANDIN_BASE": base})
    assert r.returncode == 2, r.stdout + r.stderr
    assert said in r.stderr and "run the same command again" in r.stderr
    done = json.loads((rd / "stages.json").read_text())
    assert "tok" in done and "base" not in done and not (rd / "sft.out").exists()
    assert not [e for e in events if e["event"] == "done"]          # never "done", never SUCCEEDED
    outcome = json.loads((rd / "outcome.json").read_text())
    assert outcome["state"] == "FAILED" and outcome["stage"] == "base" and said in outcome["why"]
    report = (rd / "report.md").read_text()
    assert "This run failed in stage base" in report and said in report
    # the same command again: base runs (and finishes this time), then the rest; the report is clean
    r, events = _standin_pipeline(rd, {"STANDIN_BASE": "ok"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert {"tok", "base", "sft", "report"} <= set(json.loads((rd / "stages.json").read_text()))
    assert "stage tok: already done" in r.stdout and "stage base: already done" not in r.stdout
    assert not (rd / "outcome.json").exists() and "## Outcome" not in (rd / "report.md").read_text()
    assert [e for e in events if e["event"] == "done"][-1].get("state") is None


def test_the_cli_calls_a_run_finished_only_when_it_finished(tmp_path):
    """The manifest is written after every stage: a run that failed in base used to be 'already finished'."""
    from nanochat_cli.commands.run import _rerun_note
    rd = tmp_path / "local"
    rd.mkdir()
    assert _rerun_note(rd) is None                                           # a fresh run: nothing to say
    (rd / "MANIFEST.sha256").write_text("")
    (rd / "stages.json").write_text(json.dumps({"tok": {"seconds": 1}}))
    (rd / "outcome.json").write_text(json.dumps({"state": "FAILED", "stage": "base",
                                                 "why": "stage 'base' was stopped by SIGTERM at step 46"}))
    note = _rerun_note(rd)
    assert "did not finish" in note and "SIGTERM at step 46" in note and "already finished" not in note
    (rd / "outcome.json").unlink()
    (rd / "stages.json").write_text(json.dumps({s: {"seconds": 1} for s in ("tok", "base", "sft", "eval", "report")}))
    assert "already finished" in _rerun_note(rd)


@pytest.mark.parametrize("stages", [",", "tok,bsae"])
def test_the_pipeline_and_the_cli_refuse_the_same_stages_in_the_same_words(stages, tmp_path):
    """--stages has one check (pipeline.parse_stages): the pipeline run by hand refuses what `nanochat train`
    refuses, before it takes the run dir's lock, with the same line."""
    from nanochat_cli.main import app
    from nanochat_core.stages.pipeline import Pipeline
    r = CliRunner().invoke(app, ["train", "--local", "--dryrun", "--stages", stages])
    assert r.exit_code == 2
    with pytest.raises(NanochatError) as e:
        Pipeline(parse_args(["--run-dir", str(tmp_path / "r"), "--stages", stages])).run()
    assert str(e.value) in r.stderr and "--stages takes a comma list from preflight,tok," in str(e.value)
    assert not (tmp_path / "r").exists()
