"""
A stand-in for `python -m nanochat_core.stages.pipeline` with the same command line and the same observable
behaviour that the CLI depends on: progress events on stdout, one checkpoint file per few steps,
resume from the latest checkpoint after being killed, stages.json, MANIFEST.sha256 at the end (written
by the real pipeline's own write_manifest). The CLI tests run it through the local backend
(NANOCHAT_PIPELINE_MODULE=test_cli_jobscript) when a quick, deterministic job is needed.

Not a test module: pytest collects nothing from it.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    from nanochat_core.common import atomic_write_json, emit
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--preset", default="local")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--minutes", type=float)
    p.add_argument("--stages", default="tok,base,sft,eval,report")
    p.add_argument("--data")
    p.add_argument("--deadline-at", type=float)
    p.add_argument("--price-per-hour", type=float)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int)
    p.add_argument("--force", action="store_true")
    p.add_argument("--planned-tokens-per-sec", type=float)
    p.add_argument("--spec", type=Path)   # the run spec (its money is the real pipeline's business)
    for flag in ("--user-data", "--user-data-sha256", "--docs-share", "--chat-share"):   # your own data
        p.add_argument(flag)
    a = p.parse_args()
    if a.data == "fail":  # how a stage failure looks to the CLI: a message, a non-zero exit
        print("error: no data source named 'fail'", flush=True)
        return 2
    step_s = float(os.environ.get("FAKEJOB_STEP_S", "0.02"))
    rd = a.run_dir
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "job_args.json").write_text(json.dumps(sys.argv[1:]))   # what the CLI asked of the pipeline
    done_file = rd / "stages.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    for stage in a.stages.split(","):
        if stage in done and not a.force:
            print(f"stage {stage}: already done, skipping", flush=True)
            continue
        emit("stage_start", stage=stage, pipeline=True)
        start = time.time()
        if stage == "tok":
            (rd / "tokenizer").mkdir(exist_ok=True)
            (rd / "tokenizer" / "tokenizer.json").write_text('{"fake": true}\n')
        elif stage in ("base", "sft"):
            ck = rd / stage
            ck.mkdir(exist_ok=True)
            existing = sorted(ck.glob("ckpt_*"))
            first = int(existing[-1].name.split("_")[1]) if existing else 0
            if first:
                emit("resumed", stage=stage, step=first)
            total = a.steps
            hold = os.environ.get("FAKEJOB_HOLD_FILE")   # a test's gate: base waits at step 20 until it exists
            for step in range(first + 1, total + 1):
                time.sleep(step_s)
                while hold and stage == "base" and step == 20 and not os.path.exists(hold):
                    time.sleep(0.05)
                print(f"{stage} line {step:04d}", flush=True)
                emit("progress", stage=stage, step=step, total_steps=total, loss=5.0 / step,
                     tokens_per_sec=1000.0, mfu=1.5, elapsed_s=(step - first) * step_s)
                if step % 5 == 0 or step == total:
                    d = ck / f"ckpt_{step:06d}"
                    d.mkdir(exist_ok=True)
                    (d / "model.safetensors").write_bytes(os.urandom(64))
                    emit("checkpoint", stage=stage, step=step, path=str(d))
        elif stage == "eval":
            # The report module's layout: eval/<stage>.json = {"stage", "metrics"}.
            (rd / "eval").mkdir(exist_ok=True)
            atomic_write_json(rd / "eval" / "base.json", {"stage": "BASE", "metrics": {"CORE": 0.0123}})
            atomic_write_json(rd / "eval" / "sft.json", {"stage": "SFT", "metrics": {"ARC-Easy": 0.25}})
            emit("eval", stage="base", metrics={"CORE": 0.0123})
        elif stage == "report":
            (rd / "report.md").write_text("# report\n")
        done[stage] = {"seconds": time.time() - start}
        atomic_write_json(done_file, done)
        emit("stage_end", stage=stage, seconds=round(time.time() - start, 3), pipeline=True)
    from nanochat_core.stages.pipeline import write_manifest
    write_manifest(rd)
    emit("done", run_dir=str(rd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
