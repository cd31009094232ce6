"""
The whole run, stage after stage:  python -m nanochat_core.pipeline --run-dir DIR [--preset local|cloud]

    preflight -> tok (data + tokenizer) -> base -> mid -> sft -> rl -> eval -> report

Each stage is its own process (torchrun when there is more than one GPU or node), so a crash in one
never corrupts another and every stage can also be run by hand. The pipeline is idempotent: finished
stages are recorded in run_dir/stages.json and skipped, an interrupted stage resumes from its own
checkpoints. Killing the pipeline (spot preemption, Ctrl-C) and starting it again with the same
arguments therefore continues where it stopped. This is what `nanochat train` runs, locally and on the node.

Presets: `local` is the embedded default (bundled corpus, tiny model, a few minutes on a laptop CPU);
`cloud` is the real thing (web-scale data, vocab 32768, depth from the planner).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nanochat_core.common import NanochatError, atomic_write_json, atomic_write_text, emit, run_main, sha256_file

ALL_STAGES = ["preflight", "tok", "base", "mid", "sft", "rl", "eval", "report"]
# preflight (nanochat_core/preflight.py) opens every cloud run: a minute of checks at the planned depth and
# device batch, so a broken device path or a slow node stops the job before the budget goes on it.
DEFAULT_STAGES = {"local": "tok,base,sft,eval,report", "cloud": "preflight,tok,base,mid,sft,eval,report"}

# Seconds reserved after the base-training deadline for what must still happen inside the budget:
# the final checkpoint save, SFT and the evals. The budget guard sets the trainer's deadline to
# deadline_at - reserve. Estimates for an 8xH100 node (the anchor's SFT ~10 min, evals ~15 min);
# the planner accounts for the same stages, so the two stay consistent.
RESERVE_AFTER_BASE_S = {"local": 0, "cloud": 45 * 60}


# -----------------------------------------------------------------------------
# Launch topology: one process per GPU, torchrun for anything distributed.

def gpus_per_node() -> int:
    env = os.environ.get("SKYPILOT_NUM_GPUS_PER_NODE")
    if env:
        return int(env)
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 1
    except ImportError:
        return 1


def launcher(nproc: int, nnodes: int) -> list[str]:
    """The command prefix that runs `-m module` on every local process."""
    if nproc <= 1 and nnodes <= 1:
        return [sys.executable]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes <= 1:
        return cmd + ["--standalone"]
    # Multi-node: SkyPilot tells every node its rank and the IP list; node 0 hosts the rendezvous.
    ips = os.environ.get("SKYPILOT_NODE_IPS", "").split()
    rank = os.environ.get("SKYPILOT_NODE_RANK")
    if not ips or rank is None:
        raise NanochatError("--nnodes > 1 needs SKYPILOT_NODE_IPS and SKYPILOT_NODE_RANK (set by SkyPilot)")
    return cmd + [f"--nnodes={nnodes}", f"--node_rank={rank}", f"--master_addr={ips[0]}", "--master_port=29500"]


# -----------------------------------------------------------------------------
# Stage commands per preset. Each returns a list of argv lists (a stage may be several processes).

def stage_commands(stage: str, a: argparse.Namespace, data: Path, dist: list[str]) -> list[list[str]]:
    run = str(a.run_dir)
    py = [sys.executable, "-m"]
    local = a.preset == "local"
    if stage == "preflight":   # one process, one device: the per-device numbers are what it checks
        cmd = py + ["nanochat_core.preflight", "--matrix", "train", "--events", "--workdir", f"{run}/.preflight"]
        if local:
            cmd += ["--depth", str(a.depth or 4), "--seq-len", "256", "--head-dim", "64", "--vocab-size", "4096"]
        else:
            cmd += ["--depth", str(a.depth or 20)]
        if a.planned_tokens_per_sec:
            cmd += ["--planned-tokens-per-sec", str(a.planned_tokens_per_sec)]
        return [cmd]
    if stage == "tok":
        vocab = "4096" if local else "32768"
        max_chars = "20000000" if local else "2000000000"
        return [py + ["nanochat_core.tok_train", "--data", str(data), "--out", f"{run}/tokenizer",
                      "--vocab-size", vocab, "--max-chars", max_chars, "--doc-cap", "10000"]]
    if stage == "base":
        cmd = dist + ["-m", "nanochat_core.base_train", "--run-dir", run, "--data", str(data)]
        if local:
            # Tiny model for a 2-core CPU: depth 4, 64-dim heads, 256-token context, ~2.5 minutes.
            cmd += ["--depth", str(a.depth or 4), "--head-dim", "64", "--seq-len", "256"]
            cmd += ["--steps", str(a.steps)] if a.steps else ["--minutes", str(a.minutes or 2.5)]
        else:
            cmd += ["--depth", str(a.depth or 20)]
            cmd += ["--steps", str(a.steps)] if a.steps else []
            cmd += ["--minutes", str(a.minutes)] if a.minutes else []
        return [cmd]
    if stage == "mid":
        return [dist + ["-m", "nanochat_core.mid_train", "--run-dir", run] + _tiny(a)]
    if stage == "sft":
        extra = ["--source", "local"] if local else []
        return [dist + ["-m", "nanochat_core.chat_sft", "--run-dir", run] + extra + _tiny(a)]
    if stage == "rl":
        return [dist + ["-m", "nanochat_core.chat_rl", "--run-dir", run] + _tiny(a)]
    if stage == "eval":
        limit = ["--max-per-task", "50" if local else "0"]
        return [dist + ["-m", "nanochat_core.base_eval", "--run-dir", run, "--data", str(data)] + limit,
                dist + ["-m", "nanochat_core.chat_eval", "--run-dir", run, "--stage", "all"] + limit]
    if stage == "report":
        cmd = py + ["nanochat_core.report", "--run-dir", run]
        return [cmd + (["--price-per-hour", str(a.price_per_hour)] if a.price_per_hour else [])]
    raise AssertionError(stage)


def _tiny(a: argparse.Namespace) -> list[str]:
    """Post-training stages on the local preset get a short horizon; the cloud uses their defaults."""
    if a.preset != "local":
        return []
    return ["--steps", str(a.steps)] if a.steps else ["--minutes", "1"]


# -----------------------------------------------------------------------------
# Data: the bundled corpus locally; on the cloud, the first shards synchronously (the tokenizer trains
# on them) and the rest in a background thread that overlaps with tokenizer training.

def prepare_data(a: argparse.Namespace) -> tuple[Path, threading.Thread | None]:
    from nanochat_core import dataset
    spec = a.data or ("bundled" if a.preset == "local" else dataset.DEFAULT_SOURCE)
    src = dataset.resolve_source(spec)
    if src.bundled or src.local_dir is not None:
        return dataset.prepare_data(src), None
    # ~2B characters for the tokenizer (DESIGN.md) is about 8 shards; they (and the validation shard)
    # come first, the rest downloads while the tokenizer trains.
    first = min(a.num_shards, 8)
    dest = dataset.prepare_data(src, first)
    rest = None
    if a.num_shards > first:
        def fetch_rest() -> None:
            try:
                dataset.download(src, a.num_shards, dest, progress=False)
            except BaseException as e:  # surfaced when base training joins this thread
                rest.error = e
        rest = threading.Thread(target=fetch_rest, daemon=True)
        rest.error = None
        rest.start()
    return dest, rest


# -----------------------------------------------------------------------------

class Pipeline:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.run_dir: Path = a.run_dir
        self.stages_file = self.run_dir / "stages.json"
        self.child: subprocess.Popen | None = None
        self.stopping = False

    def done_stages(self) -> dict:
        import json
        try:
            return json.loads(self.stages_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def mark_done(self, stage: str, started: float) -> None:
        record = self.done_stages()
        now = time.time()
        record[stage] = {"seconds": round(now - started, 2), "started": started, "finished": now}
        atomic_write_json(self.stages_file, record)

    def run_cmd(self, cmd: list[str], env: dict) -> int:
        print(f"$ {shlex.join(cmd)}", flush=True)
        # A new session so a preemption signal we forward reaches torchrun's whole process tree.
        self.child = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            return self.child.wait()
        finally:
            self.child = None

    def refresh_report(self) -> None:
        """report.md is rewritten as stages finish, so a run cut short by its budget still has one."""
        from nanochat_core.report import write_report
        try:
            write_report(self.run_dir, self.a.price_per_hour)
        except Exception as e:  # a report problem must never cost the user a finished stage
            print(f"warning: could not update report.md ({e})", flush=True)

    def forward_signal(self, signum: int, _frame) -> None:
        self.stopping = True
        if self.child is not None:
            try:
                os.killpg(self.child.pid, signum)
            except ProcessLookupError:
                pass

    def run(self) -> None:
        a = self.a
        stages = [s.strip() for s in (a.stages or DEFAULT_STAGES[a.preset]).split(",") if s.strip()]
        unknown = [s for s in stages if s not in ALL_STAGES]
        if unknown:
            raise NanochatError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(ALL_STAGES)}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, self.forward_signal)
        signal.signal(signal.SIGINT, self.forward_signal)

        nproc = a.nproc_per_node or gpus_per_node()
        dist = launcher(nproc, a.nnodes)
        done = self.done_stages()
        need_data = any(s in stages and (a.force or s not in done) for s in ("tok", "base", "eval"))
        data = background = None

        for stage in stages:
            if stage in done and not a.force:
                print(f"stage {stage}: already done, skipping", flush=True)
                continue
            if data is None and stage != "preflight":   # after preflight: a failing node downloads nothing
                data, background = prepare_data(a) if need_data else (Path(a.data or "."), None)
            if stage == "base" and background is not None:
                background.join()  # all shards must be on disk before training reads past the first ones
                if background.error is not None:
                    raise NanochatError(f"downloading the training shards failed: {background.error}")
            env = dict(os.environ)
            if a.preset == "local":
                # The embedded default promises no network: hub-backed evals report "unavailable" at once
                # (or use what an earlier online run cached) instead of retrying unreachable hosts.
                env.setdefault("HF_HUB_OFFLINE", "1")
                env.setdefault("HF_DATASETS_OFFLINE", "1")
            if a.deadline_at:
                reserve = RESERVE_AFTER_BASE_S[a.preset] if stage == "base" else 0
                env["NANOCHAT_DEADLINE"] = str(a.deadline_at - reserve)
            started = time.time()
            emit("stage_start", stage=stage, pipeline=True)
            for cmd in stage_commands(stage, a, data, dist):
                rc = self.run_cmd(cmd, env)
                if self.stopping:
                    emit("error", stage=stage, message="stopped by signal; run again to resume")
                    sys.exit(143)
                if rc != 0:
                    emit("error", stage=stage, message=f"exit code {rc}")
                    raise NanochatError(f"stage '{stage}' failed (exit code {rc}); fix the cause and run the same "
                                        f"command again: finished stages are skipped, this one resumes")
            self.mark_done(stage, started)
            emit("stage_end", stage=stage, seconds=round(time.time() - started, 2), pipeline=True)
            if stage != "report":
                self.refresh_report()

        write_manifest(self.run_dir)
        emit("done", run_dir=str(self.run_dir))


def write_manifest(run_dir: Path) -> None:
    """sha256sum-format list of every file `nanochat pull` brings back (checkpoints, tokenizer, report).
    Written on the node at the end; the puller verifies its copy against it."""
    lines = []
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if not p.is_file() or rel.name == "MANIFEST.sha256" or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.name == "pipeline.log":  # still being appended to while we hash
            continue
        lines.append(f"{sha256_file(p)}  {rel.as_posix()}")
    atomic_write_text(run_dir / "MANIFEST.sha256", "\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="where everything of this run is written")
    p.add_argument("--preset", choices=["local", "cloud"], default="local")
    p.add_argument("--depth", type=int, default=None, help="model depth (the one model dial)")
    p.add_argument("--steps", type=int, default=None, help="fixed number of base steps (tests, smoke runs)")
    p.add_argument("--minutes", type=float, default=None, help="time-bounded base training")
    p.add_argument("--stages", default=None, help=f"comma list from {','.join(ALL_STAGES)}")
    p.add_argument("--data", default=None, help="data source: bundled, climbmix, fineweb-edu, a URL list or a dir")
    p.add_argument("--num-shards", type=int, default=170, help="shards to download (cloud; the last is validation)")
    p.add_argument("--deadline-at", type=float, default=None, help="unix time by which everything must be done")
    p.add_argument("--price-per-hour", type=float, default=None, help="for the costs in report.md")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: GPUs)")
    p.add_argument("--nnodes", type=int, default=int(os.environ.get("SKYPILOT_NUM_NODES", "1")))
    p.add_argument("--force", action="store_true", help="re-run stages already marked done")
    p.add_argument("--planned-tokens-per-sec", type=float, default=None,
                   help="the plan's tokens/s per GPU: preflight stops the run under half of it")
    a = p.parse_args(argv)
    a.run_dir = a.run_dir.expanduser().resolve()
    return a


def main() -> None:
    Pipeline(parse_args()).run()


if __name__ == "__main__":
    run_main(main)
