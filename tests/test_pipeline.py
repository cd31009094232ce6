"""The pipeline's launch topology and the trainer's per-GPU presets: pure functions, checked for the
properties the rest of the system relies on."""
import json
import sys

import pytest
from typer.testing import CliRunner

from nanochat_core.common import NanochatError
from nanochat_core.training import preset_device_batch
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


def test_local_dryrun_plan_counts_the_model_the_local_preset_trains():
    import torch
    from nanochat_cli.main import app
    from nanochat_core.model import GPT, config_for_depth
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
