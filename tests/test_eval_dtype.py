"""`nanochat eval --dtype`: the evaluation runs with the weights asked for (the real CLI, the local backend, the
real pipeline and its eval stage), the default stays what training's evaluations used (so report.md compares
with them), and a bad name is one line. (A cloud run's node gets it in its arguments: test_cli_money.)"""
import json
import os
import subprocess
import sys

import torch

from nanochat_core.gpt import checkpoint
from nanochat_core.gpt.checkpoint import save_checkpoint
from tiny_models import noisy_tiny_model

PY = sys.executable


def _run_with_a_base_checkpoint(run, tokenizer):
    """A run dir with one base checkpoint of a depth-1 model whose every weight is non-trivial."""
    tokenizer.save(run / "tokenizer")
    model = noisy_tiny_model(tokenizer)
    return save_checkpoint(run / "base", 1, model, torch.optim.AdamW(model.parameters()),
                           {"tokenizer_hash": tokenizer.hash}, 0, 1)


def _eval(home, ckpt, *flags, env_extra=None):
    env = dict(os.environ, NANOCHAT_HOME=str(home), OMP_NUM_THREADS="1", **(env_extra or {}))
    p = subprocess.run([PY, "-m", "nanochat_cli.main", "eval", "--local", "--checkpoint", str(ckpt), "--json",
                        *flags], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((ckpt.parent.parent / "eval" / "base.json").read_text())


def test_eval_dtype_int8_evaluates_the_int8_weights_and_the_default_is_trainings(tmp_path, tiny_tokenizer):
    home = tmp_path / "home"
    run = home / "runs" / "r"
    ckpt = _run_with_a_base_checkpoint(run, tiny_tokenizer)
    # No --dtype: what training measured (fp32 on this CPU).
    default = _eval(home, ckpt)
    assert default["weights"] == "fp32" and default["dtype_asked"] is None
    assert not checkpoint.quantized_cache_path(ckpt, "int8").exists()
    assert "Weights chosen with" not in (run / "report.md").read_text()

    int8 = _eval(home, ckpt, "--dtype", "int8")
    assert int8["weights"] == "int8" and int8["dtype_asked"] == "int8"
    assert checkpoint.quantized_cache_path(ckpt, "int8").is_file()   # the stage loaded (and cached) int8 weights
    assert "fp32 weights" in (log := (run / "pipeline.log").read_text()) and "int8 weights" in log
    # the same data, other weights: a bpb a little different, not another model's
    a, b = default["metrics"]["bpb"], int8["metrics"]["bpb"]
    assert a != b and abs(b - a) / a < 0.02, (a, b)
    assert "Weights chosen with `nanochat eval --dtype`: BASE int8" in (run / "report.md").read_text()


def test_a_bad_dtype_is_one_line_and_nothing_is_launched(tmp_path, tiny_tokenizer):
    home = tmp_path / "home"
    run = home / "runs" / "r"
    ckpt = _run_with_a_base_checkpoint(run, tiny_tokenizer)
    p = subprocess.run([PY, "-m", "nanochat_cli.main", "eval", "--local", "--checkpoint", str(ckpt), "--dtype",
                        "int3"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, NANOCHAT_HOME=str(home)))
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == ["error: --dtype must be one of auto, fp32, bf16, int8, int4 (got 'int3')"]
    assert not (run / "pipeline.log").exists() and not (run / "eval").exists()
