"""
Stand-in stage processes for the REAL pipeline (nanochat_core.stages.pipeline), so the node-side money logic -
deadlines, budget-truncated ends, killing a stage's whole tree, the manifest after every stage - runs
end to end in a second or two instead of training a model. Not a test module.

    python tests/stage_standins.py pipeline PIPELINE_ARGS...   the real Pipeline, each stage replaced by
                                                               `python stage_standins.py stage NAME RUN_DIR`
With env STANDIN_LOG, every stage appends "<stage> <tokenizer sha256 prefix>" to that file.
Behaviour per stage from env STANDIN_<STAGE> (default "ok"):
    ok                   write <stage>.out (tok: also a fresh tokenizer/tokenizer.json; a training stage: also
                         a checkpoint and the end record of a finished stage) and exit 0
    train:STEPS:STEP_S   train-like: a checkpoint every step, stop cleanly (exit 0) at NANOCHAT_DEADLINE
                         (what base_train's StopGuard does), recording step and planned total_steps
    sigterm:STEPS:AT     what a real trainer does when a SIGTERM reaches it alone at step AT: save, write the
                         end record of a stopped stage, exit 0 (a clean, resumable stop)
    nothing              a training stage whose horizon was over before its first step: exit 0, nothing saved
    cut:STEPS:AT         what a real trainer does when its deadline (NANOCHAT_DEADLINE) arrives at step AT of
                         STEPS: save, write the end record of a stage stopped by its deadline, exit 0
With env STANDIN_CLOCK_JUMP=STAGE:SECONDS the pipeline's clock jumps that far ahead once STAGE is under way
(it writes RUN_DIR/STAGE.started) - an injected clock: a deadline "arrives" during that stage however busy the
machine is.
    hang                 ignore SIGTERM, start a grandchild in its own session that ignores SIGTERM too,
                         write both pids to RUN_DIR/pids.txt, and sleep forever
    busy:FILE            a stage deep in something it cannot stop (compiling): ignore SIGTERM, write its pid
                         to RUN_DIR/pids.txt, and exit 0 once FILE exists
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path


def stage(name: str, run_dir: Path) -> int:
    spec = os.environ.get(f"STANDIN_{name.upper()}", "ok")
    if os.environ.get("STANDIN_LOG"):   # which node ran which stage, with which tokenizer (multi-node tests)
        tok = run_dir / "tokenizer" / "tokenizer.json"
        sha = hashlib.sha256(tok.read_bytes()).hexdigest()[:12] if tok.is_file() else "-"
        with open(os.environ["STANDIN_LOG"], "a") as f:
            f.write(f"{name} {sha}\n")
    training = name in ("base", "mid", "sft", "rl")
    if spec == "ok":
        if name == "tok":   # a fresh tokenizer each time, as a retrained one may differ
            (run_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
            (run_dir / "tokenizer" / "tokenizer.json").write_text(os.urandom(16).hex())
        if training:   # a fresh one trains 1 step; a resumed one its planned steps (a real trainer's horizon)
            metas = [json.loads(m.read_text()) for m in (run_dir / name).glob("ckpt_*/meta.json")]
            total = max([m["plan"]["total_steps"] for m in metas] + [1])
            _checkpoint(run_dir, name, total, total)
            _end(run_dir, name, total, None)
        (run_dir / f"{name}.out").write_text(f"{name} done\n")
        return 0
    if spec.startswith("train:"):
        _, steps, step_s = spec.split(":")
        deadline = float(os.environ.get("NANOCHAT_DEADLINE") or "inf")
        (run_dir / f"{name}.deadline").write_text(os.environ.get("NANOCHAT_DEADLINE", ""))
        step = 0
        while step < int(steps) and time.time() < deadline:
            time.sleep(float(step_s))
            step += 1
        _checkpoint(run_dir, name, step, int(steps))
        _end(run_dir, name, step, None if step >= int(steps) else "deadline")
        return 0
    if spec.startswith("sigterm:"):
        _, steps, at = spec.split(":")
        _checkpoint(run_dir, name, int(at), int(steps))
        _end(run_dir, name, int(at), "SIGTERM")
        return 0
    if spec.startswith("cut:"):
        _, steps, at = spec.split(":")
        (run_dir / f"{name}.deadline").write_text(os.environ.get("NANOCHAT_DEADLINE", ""))
        _checkpoint(run_dir, name, int(at), int(steps))
        _end(run_dir, name, int(at), "deadline")
        return 0
    if spec == "nothing":
        _end(run_dir, name, 0, None)
        return 0
    if spec == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grand = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                  "signal.SIG_IGN); time.sleep(1000)"], start_new_session=True)
        (run_dir / "pids.txt").write_text(f"{os.getpid()} {grand.pid}\n")
        (run_dir / f"{name}.started").write_text("")
        time.sleep(1000)
    if spec.startswith("busy:"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (run_dir / "pids.txt").write_text(f"{os.getpid()}\n")
        release = Path(spec.split(":", 1)[1])
        for _ in range(6000):   # bounded: 10 minutes at most, even if the test never releases it
            if release.exists():
                return 0
            time.sleep(0.1)
        return 1
    raise SystemExit(f"unknown stand-in {spec}")


def _checkpoint(run_dir: Path, name: str, step: int, total_steps: int) -> None:
    d = run_dir / name / f"ckpt_{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for fname in ("model.safetensors", "optim_rank000.pt"):   # what a real 1-rank checkpoint holds
        blob = os.urandom(256)
        (d / fname).write_bytes(blob)
        files[fname] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    meta = {"step": step, "world_size": 1, "config": {}, "plan": {"total_steps": total_steps}, "files": files}
    from nanochat_core.gpt.checkpoint import meta_digest
    meta["meta_sha256"] = meta_digest(meta)   # checkpoint.verify_checkpoint accepts only self-vouching meta
    (d / "meta.json").write_text(json.dumps(meta))


def _end(run_dir: Path, name: str, step: int, stopped_by: str | None) -> None:
    """The end record stage_run.StageRun.finish writes (same fields)."""
    (run_dir / name).mkdir(parents=True, exist_ok=True)
    (run_dir / name / "end.json").write_text(json.dumps({
        "step": step, "finished": stopped_by is None and step > 0, "checkpoint_step": step if step else None,
        "stopped_by": stopped_by}))


def pipeline(argv: list[str]) -> None:
    from nanochat_core.stages import pipeline as pl
    jump_stage, _, jump_s = os.environ.get("STANDIN_CLOCK_JUMP", "").partition(":")
    run_dir = Path(argv[argv.index("--run-dir") + 1])

    def clock() -> float:
        jumped = jump_stage and (run_dir / f"{jump_stage}.started").exists()
        return time.time() + (float(jump_s) if jumped else 0.0)
    pl.stage_commands = lambda name, a, data, dist: [[sys.executable, __file__, "stage", name, str(a.run_dir)]]
    pl.time = types.SimpleNamespace(time=clock, sleep=time.sleep)
    pl.prepare_data = lambda a: (a.run_dir, None)
    pl.STOP_GRACE_S = float(os.environ.get("STANDIN_GRACE_S", "1"))
    from nanochat_core.common import run_main
    run_main(lambda: pl.Pipeline(pl.parse_args(argv)).run())


if __name__ == "__main__":
    if sys.argv[1] == "stage":
        sys.exit(stage(sys.argv[2], Path(sys.argv[3])))
    pipeline(sys.argv[2:])
