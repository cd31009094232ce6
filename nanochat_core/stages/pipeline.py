"""
The whole run, stage after stage:  python -m nanochat_core.stages.pipeline --run-dir DIR [--preset local|cloud]

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
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nanochat_core import run_spec, tracking
from nanochat_core.common import NanochatError, atomic_write_json, atomic_write_text, emit, run_main, sha256_file
from nanochat_core.evaluation.report import write_report
from nanochat_core.node import proctree, runlock
from nanochat_core.node.lead_link import LeadLink, wait_for_file

ALL_STAGES = ["preflight", "tok", "base", "mid", "sft", "rl", "eval", "report"]


def read_json(path: Path):
    """The JSON in `path`, or None when it is missing or unreadable: a record this run has not written yet."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


def parse_stages(text: str) -> list[str]:
    """`--stages` (a comma list from ALL_STAGES) as a list, or one line saying what is wrong: the pipeline's
    check and `nanochat train`'s, which refuses it before anything is paid for."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in ALL_STAGES]
    if not chosen or unknown:
        what = f"unknown stage(s) {', '.join(unknown)}" if unknown else f"no stage in '{text}'"
        raise NanochatError(f"{what}: --stages takes a comma list from {','.join(ALL_STAGES)}")
    return chosen

# preflight (nanochat_core/training/preflight.py) opens every cloud run: a minute of checks at the planned depth and
# device batch, so a broken device path or a slow node stops the job before the budget goes on it.
DEFAULT_STAGES = {"local": "tok,base,sft,eval,report", "cloud": "preflight,tok,base,mid,sft,eval,report"}
# The local preset's model, for a 2-core CPU: depth 4, 64-dim heads, 256-token rows, a 4096-token vocab. Written
# once: `nanochat train --local --dryrun` counts the same model.
LOCAL_MODEL = {"depth": 4, "vocab_size": 4096, "head_dim": 64, "sequence_len": 256}
# The embedded default trains a FIXED amount, so the same command gives the same model (same steps, same val
# bpb) on an idle laptop and on a busy one; only the time it takes differs. (It once planned base training by
# the clock, `--minutes 2.5`: under load, compiling and timing ate the whole budget and base trained 0 steps.)
# 200 base steps of 2,048 tokens is what an idle 2-core CPU did in those 2.5 minutes (192 steps, bpb 1.67);
# SFT gets 60 steps of the shipped chat set. The minutes below are estimates shown to the user, never limits.
LOCAL_BASE_STEPS = 200
LOCAL_POST_STEPS = 60
LOCAL_BASE_MINUTES = 2.5
# The stages that train and checkpoint: each says whether it finished its work in <stage>/end.json
# (stage_run.StageRun.finish), and only a finished one is recorded in stages.json.
TRAINING_STAGES = ("base", "mid", "sft", "rl")

# When base training must stop comes from the run spec (`--spec`: its base_deadline_at, which `nanochat train`
# computes from the plan's hard cap - the budget, or a capped plan's own cost - the dearest failover price and
# the planned post-base stages; the plan counts preflight before base): one source of truth. Only a
# hand-made run with a --deadline-at and no base deadline falls back to reserving this much after base.
RESERVE_AFTER_BASE_S = {"local": 0, "cloud": 45 * 60}
# A base stage cut by its deadline below this fraction of its planned steps ends the run right there as
# budget-truncated: SFT and evals of a barely trained model would only spend money. Above it, post-training
# still runs, and the run is still reported as budget-truncated (never as a plain success).
MIN_BASE_FRACTION = 0.5
# Seconds a stage gets to save and exit after SIGTERM at the job deadline before its whole tree is killed.
STOP_GRACE_S = 30.0
TRUNCATED = "BUDGET_TRUNCATED"


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
        cmd = py + ["nanochat_core.training.preflight", "--matrix", "train", "--events", "--workdir", f"{run}/.preflight"]
        if local:
            m = LOCAL_MODEL
            cmd += ["--depth", str(a.depth or m["depth"]), "--seq-len", str(m["sequence_len"]),
                    "--head-dim", str(m["head_dim"]), "--vocab-size", str(m["vocab_size"])]
        else:
            cmd += ["--depth", str(a.depth or 20)]
        if a.planned_tokens_per_sec:
            cmd += ["--planned-tokens-per-sec", str(a.planned_tokens_per_sec)]
        return [cmd]
    if stage == "tok":
        vocab = str(LOCAL_MODEL["vocab_size"]) if local else "32768"
        max_chars = "20000000" if local else "2000000000"
        return [py + ["nanochat_core.stages.tok_train", "--data", str(data), "--out", f"{run}/tokenizer",
                      "--vocab-size", vocab, "--max-chars", max_chars, "--doc-cap", "10000"]]
    if stage == "base":
        cmd = dist + ["-m", "nanochat_core.stages.base_train", "--run-dir", run, "--data", str(data)]
        if local:
            m = LOCAL_MODEL
            cmd += ["--depth", str(a.depth or m["depth"]), "--head-dim", str(m["head_dim"]), "--seq-len", str(m["sequence_len"])]
            # a fixed number of steps unless the user asked for a time-bounded run (--minutes)
            cmd += ["--minutes", str(a.minutes)] if a.minutes and not a.steps else ["--steps", str(a.steps or LOCAL_BASE_STEPS)]
        else:
            cmd += ["--depth", str(a.depth or 20)]
            cmd += ["--steps", str(a.steps)] if a.steps else []
            cmd += ["--minutes", str(a.minutes)] if a.minutes else []
        return [cmd]
    if stage == "mid":
        return [dist + ["-m", "nanochat_core.stages.mid_train", "--run-dir", run] + _tiny(a) + _yours(a)]
    if stage == "sft":
        extra = ["--source", "local"] if local else []
        return [dist + ["-m", "nanochat_core.stages.chat_sft", "--run-dir", run] + extra + _tiny(a) + _yours(a)]
    if stage == "rl":
        return [dist + ["-m", "nanochat_core.stages.chat_rl", "--run-dir", run] + _tiny(a)]
    if stage == "eval":
        dtype = ["--dtype", a.eval_dtype] if a.eval_dtype else []   # `nanochat eval --dtype`: every evaluation
        limit = ["--max-per-task", "50" if local else "0"] + dtype
        if a.eval_checkpoint:   # one named checkpoint (or stage dir), and only it: `nanochat eval --checkpoint`
            target, which = str(a.run_dir / a.eval_checkpoint), Path(a.eval_checkpoint).parts[0]
            if which == "base":
                return [dist + ["-m", "nanochat_core.stages.base_eval", "--run-dir", run, "--data", str(data),
                                "--checkpoint", target] + limit]
            return [dist + ["-m", "nanochat_core.stages.chat_eval", "--run-dir", run, "--stage", which,
                            "--checkpoint", target] + limit]
        cmds = [dist + ["-m", "nanochat_core.stages.base_eval", "--run-dir", run, "--data", str(data)] + limit,
                dist + ["-m", "nanochat_core.stages.chat_eval", "--run-dir", run, "--stage", "all"] + limit]
        return cmds + [c + dtype for c in _eval_yours(a, dist)]
    if stage == "report":
        cmd = py + ["nanochat_core.evaluation.report", "--run-dir", run]
        return [cmd + (["--price-per-hour", str(a.price_per_hour)] if a.price_per_hour else [])]
    raise AssertionError(stage)


def _yours(a: argparse.Namespace) -> list[str]:
    """Your conversations and identity (user_data.py) for the chat stages, with the digest they must match."""
    if not a.user_data:
        return []
    out = ["--user-data", str(a.user_data)] + (["--user-data-sha256", a.user_data_sha256] if a.user_data_sha256 else [])
    return out + (["--chat-share", str(a.chat_share)] if a.chat_share is not None else [])


def _eval_yours(a: argparse.Namespace, dist: list[str]) -> list[list[str]]:
    """bpb on the held-out slice of your documents, base and after SFT; your held-out questions answered."""
    if a.bundle is None:
        return []
    run, cmds = str(a.run_dir), []
    if a.bundle.docs is not None:
        for stage in ("base", "sft"):
            cmds.append(dist + ["-m", "nanochat_core.stages.base_eval", "--run-dir", run, "--stage", stage,
                                "--docs", str(a.bundle.docs), "--skip", "core,bpb,samples", "--if-present"])
    if a.bundle.chat is not None:
        cmds.append([sys.executable, "-m", "nanochat_core.stages.chat_eval", "--run-dir", run,
                     "--held-out", str(a.user_data)])
    return cmds


def _tiny(a: argparse.Namespace) -> list[str]:
    """Post-training stages on the local preset get a short fixed horizon (--steps, when given, is every
    training stage's: a smoke run is short throughout); the cloud uses their defaults. With your data (an
    identity to learn) a toy model needs more fine-tuning than that: 3x."""
    if a.preset != "local":
        return []
    return ["--steps", str((a.steps or LOCAL_POST_STEPS) * (3 if a.user_data else 1))]


# -----------------------------------------------------------------------------
# Data: the bundled corpus locally; on the cloud, the first shards synchronously (the tokenizer trains
# on them) and the rest in a background thread that overlaps with tokenizer training.

def prepare_data(a: argparse.Namespace) -> tuple[Path, threading.Thread | None]:
    """The data dir to train on: your documents alone, a public corpus, or both mixed at --docs-share."""
    docs = a.bundle.docs if a.bundle is not None else None
    if docs is not None and a.docs_share is None:     # your documents alone
        return docs, None
    public, rest = _prepare_public(a)
    if docs is None:
        return public, rest
    a.public_dir = public     # mixed again once every shard is on disk (Pipeline.run_stages, before base)
    return a.bundle.mixed_with(public, a.docs_share), rest


def _prepare_public(a: argparse.Namespace) -> tuple[Path, threading.Thread | None]:
    from nanochat_core.data import dataset   # lazy: pyarrow/torch, not in a bare python3
    spec = a.data or ("bundled" if a.preset == "local" else dataset.DEFAULT_SOURCE)
    src = dataset.resolve_source(spec)
    if src.bundled or src.local_dir is not None:
        return dataset.prepare_data(src), None
    # ~2B characters for the tokenizer (the reference recipe) is about 8 shards; they (and the validation shard)
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
# Secrets (HF_TOKEN, WANDB_API_KEY, cloud keys) go only to the stages that may download or log with them.
# The eval stage runs model-written code (HumanEval) and the report needs none: they get the environment
# without anything that looks like a credential, so nothing there can leak one.

_SECRET_MARKS = ("_TOKEN", "SECRET", "PASSWORD", "API_KEY", "ACCESS_KEY", "CREDENTIAL")
SECRET_FREE_STAGES = ("eval", "report")


def stage_env(stage: str, env: dict[str, str]) -> dict[str, str]:
    if stage not in SECRET_FREE_STAGES:
        return env
    clean = {k: v for k, v in env.items() if not any(m in k.upper() for m in _SECRET_MARKS)}
    clean["NANOCHAT_WANDB"] = "0"   # no key here; the pipeline logs these stages' results itself (track_results)
    return clean


def track_results(run_dir: Path) -> None:
    """wandb for the secret-free stages: the eval stage cannot reach wandb (it has no key, by design), so the
    pipeline, which has one, logs what it wrote to run_dir/eval/*.json once it has finished."""
    if not tracking.enabled():
        return
    os.environ["NANOCHAT_RUN_DIR"] = str(run_dir)
    for path in sorted((run_dir / "eval").glob("*.json")):
        record = read_json(path)
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
            tracking.log_event({"event": "eval", "stage": record.get("stage") or path.stem,
                                "metrics": record["metrics"], "time": time.time()})


# -----------------------------------------------------------------------------

class Pipeline:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.run_dir: Path = a.run_dir
        self.stages_file = self.run_dir / "stages.json"
        self.child: subprocess.Popen | None = None
        self.stopping = False
        self.lock_fd: int | None = None
        self.deadline_hit = False
        # Multi-node: every node runs this pipeline, but only node 0 keeps the books (stages.json, report,
        # manifest, outcome), runs the single-process stages (tok, report) and decides; the others would
        # write the same files at once into a shared bucket directory (last writer wins) and read them late
        # or stale, so they follow node 0's word instead (lead_link.py).
        self.lead = os.environ.get("SKYPILOT_NODE_RANK", "0") == "0"
        self.link = LeadLink(self.lead, 1)   # run() opens the real one; the others follow node 0 through it

    def save_manifest(self) -> None:
        if self.lead:
            write_manifest(self.run_dir)

    def write_outcome(self, outcome: dict) -> None:
        if self.lead:
            atomic_write_json(self.run_dir / "outcome.json", outcome)

    def done_stages(self) -> dict:
        return read_json(self.stages_file) or {}

    def mark_done(self, stage: str, started: float) -> None:
        if not self.lead:
            return
        record = self.done_stages()
        now = time.time()
        record[stage] = {"seconds": round(now - started, 2), "started": started, "finished": now}
        atomic_write_json(self.stages_file, record)

    def run_cmd(self, cmd: list[str], env: dict) -> int | None:
        """Run one stage process; at the job deadline it gets SIGTERM, and STOP_GRACE_S later its whole
        tree (whatever session its processes are in) is killed. Returns its exit code, or None when the
        deadline ended it."""
        print(f"$ {shlex.join(cmd)}", flush=True)
        # A new session so a preemption signal we forward reaches torchrun's whole process tree. The stage
        # inherits the run dir's lock and dies with us (runlock.py): never an orphan trainer.
        fds = (self.lock_fd,) if self.lock_fd is not None else ()
        self.child = subprocess.Popen(cmd, env={**env, **runlock.stage_env(self.lock_fd)}, start_new_session=True,
                                      pass_fds=fds, preexec_fn=runlock.child_setup(os.getpid()))
        runlock.record_stage(self.lock_fd, self.child.pid)
        try:
            rc = proctree.wait_or_stop(self.child, self.a.deadline_at or None, STOP_GRACE_S, "this stage",
                                      clock=time.time)   # our clock: a test injects it
            if rc is None:
                self.deadline_hit = True
            return rc
        finally:
            self.child = None

    def end_truncated(self, stage: str, why: str) -> None:
        """A clean end inside the budget: what exists is kept, listed in the manifest and reported; exit 0
        so that no scheduler (SkyPilot's managed-job recovery) treats it as a failure to retry."""
        self.link.end(0, why)
        self.fail(stage, why, state=TRUNCATED)
        emit("done", run_dir=str(self.run_dir), state=TRUNCATED, message=why)
        sys.exit(0)

    def check_base(self) -> None:
        """After base exits cleanly: did it get its planned steps (by its latest checkpoint), or did the deadline
        cut it short?"""
        meta = latest_meta(self.run_dir, "base")
        planned = int(((meta or {}).get("plan") or {}).get("total_steps") or 0)
        if not planned:
            self.end_truncated("base", "base training saved no checkpoint before the budget's base deadline; "
                                       "a larger --budget continues the run")
        done_steps = int(meta.get("step") or 0)
        if done_steps >= planned:
            return
        why = (f"base training reached step {done_steps} of {planned} planned ({done_steps / planned:.0%}) "
               "by the budget's base deadline")
        self.write_outcome({"state": TRUNCATED, "stage": "base", "why": why})
        if done_steps < MIN_BASE_FRACTION * planned:
            # Not marked done: a rerun with a larger budget resumes base from its checkpoint.
            self.end_truncated("base", why + "; stopping before post-training")
        print(f"note: {why}; post-training continues", flush=True)

    def fail(self, stage: str, why: str, state: str = "FAILED") -> None:
        """The run ends here without finishing (failed, stopped or budget-truncated): outcome.json and report.md
        say so and why (the stage is not recorded done, so the same command resumes it)."""
        emit("error", stage=stage, message=why)
        self.write_outcome({"state": state, "stage": stage, "why": why})
        self.refresh_report()
        self.save_manifest()

    def check_training_stage(self, stage: str, deadline: float | None) -> None:
        """After a training stage exited 0: record it done only when it finished its work. A stop at its
        deadline is the budget's (budget-truncated, as before); anything else that ended it early - a SIGTERM
        that reached the stage alone, 0 steps, no checkpoint - fails the run, and the same command resumes it."""
        verdict, why = stage_verdict(self.run_dir, stage)
        if verdict == "deadline" and deadline is None:
            verdict = "unfinished"   # NANOCHAT_DEADLINE from outside, not ours: nothing to call budget-truncated
        if verdict == "deadline" and stage != "base":
            self.end_truncated(stage, f"stage '{stage}' was stopped at the budget's deadline")
        if stage == "base" and deadline is not None and verdict != "unfinished":
            self.check_base()
        if verdict == "unfinished":
            self.fail(stage, why)
            raise NanochatError(f"{why}; run the same command again to resume it (finished stages are skipped)")

    def stage_deadline(self, stage: str) -> float | None:
        """The NANOCHAT_DEADLINE a stage trains against: base stops at the plan's base deadline, every
        other stage at the job deadline."""
        a = self.a
        limits = [a.deadline_at] if a.deadline_at else []
        if stage == "base":
            if a.base_deadline_at:
                limits.append(a.base_deadline_at)
            elif a.deadline_at:
                limits.append(a.deadline_at - RESERVE_AFTER_BASE_S[a.preset])
        return min(limits) if limits else None

    def refresh_report(self) -> None:
        """report.md is rewritten as stages finish, so a run cut short by its budget still has one."""
        if not self.lead:
            return
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
        stages = parse_stages(a.stages or DEFAULT_STAGES[a.preset])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock_fd = runlock.acquire(self.run_dir)  # one writer per run dir; held until we exit
        signal.signal(signal.SIGTERM, self.forward_signal)
        signal.signal(signal.SIGINT, self.forward_signal)
        dist = launcher(a.nproc_per_node or gpus_per_node(), a.nnodes)
        self.link = LeadLink(self.lead, a.nnodes)
        try:
            self.run_stages(stages, dist)
        except BaseException as e:   # node 0 ends early: the other nodes end with it
            code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 2
            self.link.end(code, f"exit code {code}" if isinstance(e, SystemExit) else str(e)[:200])
            raise
        finally:
            self.link.close()

    def run_stages(self, stages: list[str], dist: list[str]) -> None:
        a = self.a
        if self.lead:
            (self.run_dir / "outcome.json").unlink(missing_ok=True)   # a relaunch decides its own outcome
            done = self.done_stages()
            self.link.tell("plan", {"run": [s for s in stages if a.force or s not in done]})
        else:   # node 0's books, never our (possibly stale) view of stages.json: see lead_link.py
            plan = self.link.ask("plan", lambda: self.stopping)
            done = {s: {} for s in stages if s not in plan["run"]}
        if a.user_data:
            self.check_user_data()
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
                if getattr(a, "public_dir", None) is not None:   # your documents: the mix again, with every shard
                    data = a.bundle.mixed_with(a.public_dir, a.docs_share)
            env = stage_env(stage, dict(os.environ))
            # wandb tracking (tracking.py), when on, names its run after this directory; stages only, not us
            env["NANOCHAT_RUN_DIR"] = str(self.run_dir)
            if a.price_per_hour:
                env["NANOCHAT_PRICE_PER_HOUR"] = str(a.price_per_hour)
            if a.preset == "local":
                # The embedded default promises no network: hub-backed evals report "unavailable" at once
                # (or use what an earlier online run cached) instead of retrying unreachable hosts.
                env.setdefault("HF_HUB_OFFLINE", "1")
                env.setdefault("HF_DATASETS_OFFLINE", "1")
            deadline = self.stage_deadline(stage)
            if deadline is not None:
                env["NANOCHAT_DEADLINE"] = str(deadline)
                if time.time() >= deadline - 1 and self.lead:   # the others follow node 0's clock
                    self.end_truncated(stage, f"the budget's deadline for stage '{stage}' passed before it "
                                              "started; a larger --budget continues the run")
            tokenizer = self.run_dir / "tokenizer" / "tokenizer.json"
            if self.lead:   # we start this stage now, with this tokenizer
                self.link.tell(f"stage/{stage}", {"tokenizer": sha256_file(tokenizer) if tokenizer.is_file() else None})
            elif stage in ("tok", "report"):
                continue    # node 0's alone
            else:
                go = self.link.ask(f"stage/{stage}", lambda: self.stopping)
                if go["tokenizer"]:   # node 0's, not an older one still visible here
                    wait_for_file(tokenizer, go["tokenizer"], "the tokenizer", lambda: self.stopping)
            started = time.time()
            if stage in TRAINING_STAGES and self.lead:   # its verdict must come from this run of it
                (self.run_dir / stage / END_FILE).unlink(missing_ok=True)
            emit("stage_start", stage=stage, pipeline=True)
            for cmd in stage_commands(stage, a, data, dist):
                rc = self.run_cmd(cmd, env)
                if self.deadline_hit:
                    self.end_truncated(stage, f"stage '{stage}' was stopped at the budget's deadline")
                if self.stopping:
                    self.fail(stage, f"stage '{stage}' was stopped by a signal; run the same command again to "
                                     "resume", state="STOPPED")
                    sys.exit(143)
                if rc != 0:
                    self.fail(stage, f"stage '{stage}' failed (exit code {rc})")
                    raise NanochatError(f"stage '{stage}' failed (exit code {rc}); fix the cause and run the same "
                                        f"command again: finished stages are skipped, this one resumes")
            if stage == "tok" and a.user_data and self.lead:
                self.check_user_data_with_tokenizer()
            if stage in TRAINING_STAGES and self.lead:
                self.check_training_stage(stage, deadline)
            self.mark_done(stage, started)
            if stage == "eval":
                track_results(self.run_dir)
            emit("stage_end", stage=stage, seconds=round(time.time() - started, 2), pipeline=True)
            if stage != "report":
                self.refresh_report()
            # The manifest lists what exists after every stage, so whatever ends the run later (deadline,
            # preemption, a crash), `nanochat pull` can verify what reached the bucket or the node's disk.
            self.save_manifest()

        self.save_manifest()
        outcome = read_json(self.run_dir / "outcome.json")
        if outcome:
            emit("done", run_dir=str(self.run_dir), state=outcome.get("state"), message=outcome.get("why"))
        else:
            emit("done", run_dir=str(self.run_dir))

    def check_user_data(self) -> None:
        """Your data (a bundle `nanochat train` prepared and, on the cloud, uploaded) is verified file by file
        against its manifest before anything trains, and must be the very bytes this run started with: the
        digest is kept in run_dir/user_data.json at the first start, so a resumed or spot-recovered run
        reading anything else stops here."""
        bundle = self.a.bundle.verify(self.a.user_data_sha256)
        record = self.run_dir / "user_data.json"
        first = read_json(record)
        if first and first.get("sha256") != bundle.digest:
            raise NanochatError(f"run {self.run_dir.name} was started with other data (sha256 "
                                f"{first.get('sha256', '?')[:12]}..., now {bundle.digest[:12]}...): use --name NEW "
                                "for a run on the changed data")
        trained = [s for s in ("base", "mid", "sft") if s in self.done_stages()]
        if not first and trained and not self.a.force:
            raise NanochatError(f"run {self.run_dir.name} already trained {', '.join(trained)} without your data: "
                                "use --name NEW for a run on it")
        print(f"your data: verified {self.a.user_data} (sha256 {bundle.digest[:12]}...)", flush=True)
        if self.lead and not first:
            atomic_write_json(record, {"sha256": bundle.digest, "info": bundle.info, "docs_share": self.a.docs_share})

    def check_user_data_with_tokenizer(self) -> None:
        """Once the tokenizer exists (before base training spends anything): conversations longer than the
        model's context are refused (or skipped with --skip-bad), and your documents' tokens are counted."""
        T = LOCAL_MODEL["sequence_len"] if self.a.preset == "local" else 2048
        tokens = self.a.bundle.check_with_tokenizer(self.run_dir, T)
        record_path = self.run_dir / "user_data.json"
        record = read_json(record_path) or {}
        if tokens is not None:
            record["docs_tokens"] = tokens
            print(f"your documents: {tokens:,} training tokens (counted with the trained tokenizer)", flush=True)
            emit("user_data", tokens=tokens)
        atomic_write_json(record_path, record)


END_FILE = "end.json"   # written by stage_run.StageRun.finish: {"step", "finished", "stopped_by"}


def latest_meta(run_dir: Path, stage: str) -> dict | None:
    """The meta of a stage's latest checkpoint (its files' sizes checked, not their hashes: fast on GBs), or None."""
    from nanochat_core.gpt import checkpoint   # lazy: pyarrow/torch, not in a bare python3
    try:
        found = checkpoint.find_latest(run_dir / stage, hashes=False)
        return checkpoint.read_meta(found) if found else None
    except Exception:
        return None


def stage_verdict(run_dir: Path, stage: str) -> tuple[str, str]:
    """("finished" | "deadline" | "unfinished", why) for a training stage that exited 0, from the end record it
    wrote and the checkpoint it left. Exit 0 alone says little: a stage stopped by SIGTERM saves and exits 0
    (resumable by design), and one whose horizon was over before its first step exits 0 with nothing saved."""
    end = read_json(run_dir / stage / END_FILE)
    if end is None:
        return "unfinished", f"stage '{stage}' exited without saying it finished its work (no {stage}/{END_FILE})"
    step = int(end.get("step") or 0)
    meta = latest_meta(run_dir, stage)
    saved = int(meta.get("step") or 0) if meta else None
    by = end.get("stopped_by")
    if by == "deadline":
        return "deadline", f"stage '{stage}' stopped at its deadline at step {step}"
    if by:
        return "unfinished", f"stage '{stage}' was stopped by {by} at step {step} before finishing its work"
    if step <= 0 or saved is None:
        return "unfinished", (f"stage '{stage}' trained {step} steps and saved no checkpoint (a time-bounded run "
                              "too short for this machine? drop --minutes, or give it more)")
    if not end.get("finished") or saved != step:
        return "unfinished", f"stage '{stage}' ended at step {step} without finishing its work (last checkpoint: step {saved})"
    return "finished", ""


def write_manifest(run_dir: Path) -> None:
    """sha256sum-format list of every file `nanochat pull` brings back (checkpoints, tokenizer, report).
    Rewritten on the node after every stage (and at a deadline or signal stop); the puller verifies its copy
    against it. Digests of files unchanged since the last time (same size and mtime) come from a hidden
    cache, so rewriting it after each stage costs only the new files."""
    cache_file = run_dir / ".manifest_cache.json"
    cache = read_json(cache_file) or {}
    lines, fresh = [], {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if not p.is_file() or rel.name == "MANIFEST.sha256" or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.name == "pipeline.log":  # still being appended to while we hash
            continue
        st = p.stat()
        key = rel.as_posix()
        hit = cache.get(key)
        digest = hit[2] if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns else sha256_file(p)
        fresh[key] = [st.st_size, st.st_mtime_ns, digest]
        lines.append(f"{digest}  {key}")
    atomic_write_text(run_dir / "MANIFEST.sha256", "\n".join(lines) + "\n")
    atomic_write_json(cache_file, fresh)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.stages.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="where everything of this run is written")
    p.add_argument("--preset", choices=["local", "cloud"], default="local")
    p.add_argument("--depth", type=int, default=None, help="model depth (the one model dial)")
    p.add_argument("--steps", type=int, default=None,
                   help="fixed number of base steps; on the local preset also SFT's (tests, smoke runs)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time-bounded base training (the local default is a fixed number of steps)")
    p.add_argument("--stages", default=None, help=f"comma list from {','.join(ALL_STAGES)}")
    p.add_argument("--data", default=None, help="data source: bundled, climbmix, fineweb-edu, a URL list or a dir")
    p.add_argument("--user-data", type=Path, default=None,
                   help="your documents/conversations/identity, as `nanochat train` prepared them (user_data.py)")
    p.add_argument("--user-data-sha256", default=None, help="the bundle's manifest digest; anything else is refused")
    p.add_argument("--docs-share", type=float, default=None,
                   help="your documents' share of pre-training, mixed with --data (default: only your documents)")
    p.add_argument("--chat-share", type=float, default=None, help="your conversations' share of SFT (and mid)")
    p.add_argument("--num-shards", type=int, default=170, help="shards to download (cloud; the last is validation)")
    p.add_argument("--deadline-at", type=float, default=None, help="unix time by which everything must be done")
    p.add_argument("--base-deadline-at", type=float, default=None,
                   help="unix time by which base training must stop (the plan's; default: --deadline-at less a reserve)")
    p.add_argument("--price-per-hour", type=float, default=None, help="for the costs in report.md")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: GPUs)")
    p.add_argument("--nnodes", type=int, default=int(os.environ.get("SKYPILOT_NUM_NODES", "1")))
    p.add_argument("--force", action="store_true", help="re-run stages already marked done")
    p.add_argument("--planned-tokens-per-sec", type=float, default=None,
                   help="the plan's tokens/s per GPU: preflight stops the run under half of it")
    p.add_argument("--eval-checkpoint", default=None,
                   help="the eval stage evaluates this checkpoint (or stage) dir only, relative to the run dir: "
                        "base/ckpt_000500, sft")
    p.add_argument("--eval-dtype", default=None,
                   help="the weights the eval stage evaluates with: auto|fp32|bf16|int8|int4 (quantize.py; the stages "
                        "check it); default: what training's own evaluations used, so the numbers stay comparable")
    p.add_argument("--spec", type=Path, default=None,
                   help="the run spec file `nanochat train` wrote: its deadlines and price (run_spec.py)")
    a = p.parse_args(argv)
    a.run_dir = a.run_dir.expanduser().resolve()
    if a.spec is not None:
        # The one channel for money from the launcher: a spec and hand-given deadlines would be two owners.
        if a.deadline_at or a.base_deadline_at or a.price_per_hour:
            raise NanochatError("--spec carries the deadlines and the price: drop --deadline-at, "
                                "--base-deadline-at and --price-per-hour")
        spec = run_spec.read(a.spec.expanduser())
        a.deadline_at, a.base_deadline_at, a.price_per_hour = (spec.deadline_at, spec.base_deadline_at,
                                                               spec.price_per_hour or None)
    a.bundle = None   # your data (--user-data): the bundle user_data.py prepared
    if a.user_data:
        from nanochat_core.data import user_data   # lazy: pyarrow, not in a bare python3
        a.bundle = user_data.load_bundle(a.user_data)
    named = Path(a.eval_checkpoint) if a.eval_checkpoint else None
    if named is not None and (named.is_absolute() or ".." in named.parts
                              or named.parts[:1] not in (("base",), ("mid",), ("sft",), ("rl",))):
        raise NanochatError(f"--eval-checkpoint {a.eval_checkpoint}: name a checkpoint inside the run dir, "
                            "like base/ckpt_000500 or sft")
    return a


def main() -> None:
    Pipeline(parse_args()).run()


if __name__ == "__main__":
    run_main(main)
