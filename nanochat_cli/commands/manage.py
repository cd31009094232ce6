"""
The bookkeeping commands: status (what is running and what it costs), pull (bring a run home, verified),
eval (run the evaluation stages and print the table) and down (stop spending; idempotent).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nanochat_core.common import NanochatError
from nanochat_core.run_spec import SPEC_FILE, left, spent
from nanochat_cli import state
from nanochat_cli.planning.cost import fmt_duration
from nanochat_cli.backends.base import backend_for, sky_backend
from nanochat_cli.commands.run import _console, confirm, local_cluster, stream_run
from rich.table import Table
from nanochat_core.evaluation.report import collect_metrics, your_data_lines


def billing_end(rec: dict, now: float) -> float:
    """When this record stops (or stopped) costing money: now while it runs; the moment its job or cluster
    was seen to end; and never later than its budget's deadline plus the teardown margin, which the node
    itself enforces - so a gone cluster or a finished spot run never shows a meter that grows forever."""
    end = now
    for k in ("ended_at", "ends_by"):
        if rec.get(k):
            end = min(end, float(rec[k]))
    return end


def cluster_summary(rec: dict, now: float) -> dict:
    start = float(rec.get("launched_at") or now)
    uptime = max(0.0, billing_end(rec, now) - start)
    price = float(rec.get("price_per_hour") or 0.0)
    cost = spent(price, start, billing_end(rec, now))
    budget = rec.get("budget")
    where = {**rec.get("offer", {}), **rec.get("launched", {})}  # what SkyPilot launched, when read back
    return {"name": rec["name"], "backend": rec.get("backend"), "cloud": where.get("cloud"),
            "region": where.get("region"), "instance_type": where.get("instance_type"),
            "nodes": rec.get("nodes", 1), "spot": bool(rec.get("spot")), "uptime_s": round(uptime, 1),
            "price_per_hour": price, "spent": round(cost, 4),
            "budget": budget, "budget_left": None if budget is None else round(left(budget, cost), 4)}


def run_summaries() -> list[dict]:
    out = []
    found = None   # what SkyPilot lists, asked once and only when a run's cluster has no record
    for rd in state.list_runs():
        job = state.read_job(rd)
        if not job:
            continue
        cluster = state.get_cluster(job.get("cluster"))
        if job.get("backend") == "local":
            job_state = backend_for({"backend": "local"}).job_state({}, rd)
        elif cluster is None:
            if found is None:
                found = {d["name"]: d for d in discovered_unrecorded()}
            seen = found.get(job.get("cluster")) or found.get(f"nanochat-{rd.name}")
            if seen is not None:   # no record here, but SkyPilot still has it (and it may bill)
                job_state = f"UNKNOWN (cluster {seen['state']}, not recorded: `nanochat down` tears it down)"
            else:
                job_state = job.get("state") if job.get("state") != "RUNNING" else "ENDED (cluster gone)"
        else:
            try:
                job_state = backend_for(cluster).job_state(cluster, rd)
            except NanochatError:
                job_state = "UNKNOWN"
        out.append({"run": rd.name, "cluster": job.get("cluster"), "job_id": job.get("job_id"),
                    "state": job_state, "run_dir": str(rd), "submitted_at": job.get("submitted_at")})
    return out


def note_ended(rec: dict, when: float) -> dict:
    """Record (once) when a cluster or its managed job was seen to end: its spend stops counting there."""
    if not rec.get("ended_at"):
        rec = state.update_cluster(rec["name"], ended_at=when) or {**rec, "ended_at": when}
    return rec


def discovered_unrecorded(recorded: set[str] | None = None) -> list[dict]:
    """nanochat clusters/managed jobs SkyPilot knows of that have no local record (none without SkyPilot).
    `recorded`: the names with a record (default: clusters.json's)."""
    try:
        found = sky_backend().SkyBackend().discover()
    except NanochatError:
        return []
    recorded = set(state.load_clusters()) if recorded is None else recorded
    runs = {f"nanochat-{rd.name}" for rd in state.list_runs()
            if (state.read_job(rd) or {}).get("cluster") in recorded}
    return [d for d in found if d["name"] not in recorded and d["name"] not in runs
            and d["state"] not in ("DOWN", "SUCCEEDED", "FAILED", "CANCELLED")]


def cmd_status(*, json_out: bool) -> None:
    now = time.time()
    runs = run_summaries()
    for r in runs:  # a finished managed (spot) run: its spending stopped when the job ended
        rec = state.get_cluster(r["cluster"])
        if rec and rec.get("spot") and r["state"] in ("SUCCEEDED", "FAILED", "CANCELLED", "BUDGET_TRUNCATED"):
            job = state.read_job(Path(r["run_dir"])) or {}
            note_ended(rec, float(job.get("ended_at") or now))
    clusters = [cluster_summary(r, now) for r in state.load_clusters().values()]
    for c in clusters:
        rec = state.get_cluster(c["name"])
        if c["backend"] == "sky":
            try:
                backend = backend_for(rec)
                c["state"] = backend.cluster_state(rec)
                if c["state"] == "DOWN":
                    # It tore itself down (autostop, budget): the meter stopped then; SkyPilot knows the total.
                    final = backend.final_cost(rec)
                    if final is None:
                        c.update(cluster_summary(note_ended(rec, now), now))
                    else:
                        c["spent"] = round(final, 4)
                        if c["budget"] is not None:
                            c["budget_left"] = round(c["budget"] - final, 4)
            except NanochatError as e:
                c["state"] = f"unknown ({e})"
        else:
            c["state"] = "UP"
    unrecorded = discovered_unrecorded()
    if json_out:
        out = {"clusters": clusters, "jobs": runs}
        if unrecorded:  # nanochat clusters/managed jobs SkyPilot knows of with no record here
            out["unrecorded"] = unrecorded
        print(json.dumps(out))
        return
    con = _console()
    for d in unrecorded:
        con.print(f"[yellow]SkyPilot also has nanochat {'managed job' if d['kind'] == 'managed' else 'cluster'} "
                  f"'{d['name']}' ({d['state']}) that this machine has no record of; `nanochat down` tears it "
                  "down too[/]", soft_wrap=True)
    if not clusters and not runs and not unrecorded:
        con.print("no clusters and no runs. Start with `nanochat train --local`, or `nanochat up --dryrun` "
                  "to compare cloud offers.")
        return
    t = Table(title="clusters", title_justify="left")
    for col in ("name", "where", "state", "uptime", "$/h", "spent", "budget left"):
        t.add_column(col, justify="right" if col in ("$/h", "spent", "budget left") else "left")
    for c in clusters:
        where = "this machine" if c["backend"] == "local" else f"{c['cloud']} {c['region']} {c['instance_type']}"
        t.add_row(c["name"], where, c["state"], fmt_duration(c["uptime_s"]), f"{c['price_per_hour']:.2f}",
                  f"${c['spent']:.2f}", "-" if c["budget_left"] is None else f"${c['budget_left']:.2f}")
    con.print(t)
    if any(c["state"] == "DOWN" for c in clusters):
        con.print("DOWN clusters have already torn themselves down; `nanochat down` clears the record and "
                  "prints the final cost.")
    if runs:
        j = Table(title="runs", title_justify="left")
        for col in ("run", "cluster", "job", "state", "results"):
            j.add_column(col)
        for r in runs:
            j.add_row(r["run"], str(r["cluster"]), str(r["job_id"]), str(r["state"]), r["run_dir"])
        con.print(j)


def cmd_pull(*, name: str | None, dest: Path | None) -> None:
    rd = state.find_latest_run(name, nothing="nothing to pull")
    job = state.read_job(rd) or {}
    cluster = state.get_cluster(job.get("cluster"))
    spec = state.read_spec(rd)
    if job.get("backend") == "local":
        cluster = local_cluster(record=False)
    elif cluster is None and spec is not None and spec.bucket:
        # The node is gone but the checkpoints outlived it in the bucket.
        cluster = {"name": job.get("cluster"), "backend": "sky", "bucket": spec.bucket}
    if cluster is None:
        raise NanochatError(f"nothing to pull: the cluster of run '{rd.name}' is gone and the run had no "
                            f"--bucket; whatever was pulled before is in {rd}")
    target = (dest or rd).expanduser()
    backend = backend_for(cluster)
    if backend.job_state(cluster, rd) == "RUNNING":
        raise NanochatError(f"run '{rd.name}' is still running; pull after it finishes (`nanochat logs` "
                            "shows progress)")
    start = time.time()
    n = backend.pull(cluster, rd, target)
    print(f"pulled run '{rd.name}' to {target}: {n} files verified against MANIFEST.sha256 "
          f"({time.time() - start:.1f}s). Next: `nanochat chat --checkpoint {target}`")


def cmd_eval(*, local: bool, checkpoint: Path | None, name: str | None, json_out: bool, yes: bool = False,
             dtype: str | None = None) -> None:
    """dtype: the weights to evaluate with (None: what training's evaluations used, for comparable numbers)."""
    if dtype is not None:
        from nanochat_core.gpt.quantize import resolve_dtype   # lazy: loads torch, which `nanochat --help` must not
        resolve_dtype(dtype, "cpu")   # a bad name: its one-line error now, before anything is looked up or launched
    named = None   # a checkpoint (or stage) dir inside the run, relative to it: evaluated itself, nothing else
    if checkpoint is not None:
        rd = checkpoint.expanduser().resolve()
        # A checkpoint directory (run/base/ckpt_000500) belongs to the run two levels up.
        while rd.parent != rd and not (rd / "tokenizer").exists() and rd.name.startswith(("ckpt", "base", "mid",
                                                                                           "sft", "rl")):
            rd = rd.parent
        if not rd.is_dir():
            raise NanochatError(f"{checkpoint} does not exist")
        if rd != checkpoint.expanduser().resolve():
            named = _named_checkpoint(checkpoint.expanduser().resolve(), rd, dtype)
    elif name:
        rd = state.run_dir(name)
    else:
        from nanochat_cli.commands.run import resolve_checkpoint   # lazy: only the commands that need it load it
        rd = resolve_checkpoint(None)
    if not rd.is_dir():
        raise NanochatError(f"no run at {rd}: `nanochat status` lists runs")
    job = state.read_job(rd) or {}
    cluster = None if local else state.get_cluster(job.get("cluster"))
    spec_file = None
    if cluster is None or cluster.get("backend") == "local":
        cluster = local_cluster()
        args = ["--preset", "local"]
    else:
        spec_file = _cloud_eval_spec(cluster, rd, yes)
        args = ["--preset", "cloud"]
    args += ["--stages", "eval,report", "--force"] + (["--eval-checkpoint", named] if named else [])
    args += ["--eval-dtype", dtype] if dtype else []
    from nanochat_cli.commands.run import your_data_args   # lazy: only the commands that need it load it
    args += your_data_args(state.read_json(rd / "plan.json") or {}, cluster.get("backend") == "local")
    backend = backend_for(cluster)
    job = backend.launch(cluster, rd, args, spec_file)
    state.save_log_cursor(rd, backend.name, job.get("cursor"))
    final = stream_run(rd) if not json_out else _wait_quietly(backend, cluster, rd)
    if final is None:
        return  # detached with Ctrl-C; stream_run() said how to re-attach
    if final != "SUCCEEDED":
        raise NanochatError(f"evaluation of '{rd.name}' ended {final}; see `nanochat logs --name {rd.name} "
                            "--from-start`")
    if cluster.get("backend") != "local":
        backend.pull(cluster, rd, rd)
    metrics = collect_metrics(rd)
    if json_out:
        print(json.dumps(metrics))
        return
    print_metrics(metrics, rd)


def _cloud_eval_spec(cluster: dict, rd: Path, yes: bool) -> Path:
    """Evaluating on the run's cloud cluster spends money, so only where a node is already up and billing,
    under the run's own spec (the same hard cap and deadline: eval never extends them), after saying what
    it costs. Anything that would make a new node - the cluster tore itself down, a spot run's node is
    gone with its job, the deadline passed - is refused with the ways that do work."""
    home = (f"`nanochat pull --name {rd.name}` then `nanochat eval --local --name {rd.name}` evaluates on this "
            f"machine for $0, or `nanochat train --name {rd.name} --stages eval,report --budget USD` on a new "
            "node, planned and capped")
    if cluster.get("spot"):
        raise NanochatError(f"run '{rd.name}' ran as a spot job, whose node is gone once the job ends: "
                            f"evaluating on the cloud would launch a new node. {home}")
    try:
        up = backend_for(cluster).cluster_state(cluster) == "UP"
    except NanochatError:
        up = False
    spec = state.read_spec(rd)
    if not up or spec is None or spec.deadline_at is None:
        why = "is not up" if not up else "has no run spec with a deadline"
        raise NanochatError(f"cluster '{cluster['name']}' of run '{rd.name}' {why}: evaluating there would "
                            f"launch a node without a budget. {home}")
    now = time.time()
    if spec.deadline_at <= now:
        raise NanochatError(f"run '{rd.name}' is past its budget's deadline: its node is being torn down. {home}")
    s = cluster_summary(cluster, now)
    cap = spec.spend_cap if spec.spend_cap is not None else s["budget"]
    confirm(f"Evaluate run '{rd.name}' on '{cluster['name']}' (up, ${s['price_per_hour']:.2f}/h, "
            f"${s['spent']:.2f} spent so far; the run's hard cap ${cap:.2f} and its deadline in "
            f"{(spec.deadline_at - now) / 60:.0f} min still hold)?", yes)
    return rd / SPEC_FILE


def _named_checkpoint(path: Path, rd: Path, dtype: str | None = None) -> str:
    """`eval --checkpoint` named a checkpoint or stage dir of run `rd`: it is the one evaluated (never the
    run's newest instead), so a damaged one is refused here, in one line, before anything is launched.
    dtype bf16/int8/int4: a valid cached copy of that format stands for the fp32 file (verify_checkpoint's `cached`;
    the eval stage checks again, by what it really loads on its device)."""
    from nanochat_core.gpt import checkpoint as ckpt   # lazy: loads torch, which `nanochat --help` must not
    cached = dtype if dtype in ("bf16", "int8", "int4") else None
    rel = path.relative_to(rd)
    if not path.exists():
        raise NanochatError(f"{path} does not exist: `ls {path.parent}` lists what there is")
    if not path.is_dir() or rel.parts[0] not in ("base", "mid", "sft", "rl") or len(rel.parts) > 2:
        raise NanochatError(f"{path} is not a checkpoint of run {rd}: name a stage dir (base, sft, ...), "
                            "one of its ckpt_NNNNNN dirs, or the run dir")
    if len(rel.parts) == 2:
        problem = ckpt.verify_checkpoint(path, weights_only=True, cached=cached)
        if problem:
            raise NanochatError(f"checkpoint {path} is corrupt: {problem}; name another one "
                                f"(`ls {path.parent}`) or the run dir (its newest intact checkpoints)")
    elif ckpt.find_latest(path, weights_only=True, cached=cached) is None:
        raise NanochatError(f"{path} holds no intact checkpoint: name another stage or the run dir")
    return rel.as_posix()


def _wait_quietly(backend, cluster, rd) -> str | None:
    for _line, _pos in backend.tail(cluster, rd, state.log_cursor(rd, backend.name)):
        pass
    return backend.job_state(cluster, rd)


def print_metrics(metrics: dict, rd: Path) -> None:
    stages = [s for s in ("BASE", "MID", "SFT", "RL") if metrics.get(s)]
    names = sorted({m for s in stages for m in metrics[s]})
    t = Table(title=f"metrics · {rd.name}", title_justify="left")
    t.add_column("metric")
    for s in stages:
        t.add_column(s, justify="right")
    for m in names:
        t.add_row(m, *[_fmt(metrics[s].get(m)) for s in stages])
    _console().print(t)
    for line in your_data_lines(rd)[2:]:     # (a run trained on your own data: what it learned of it)
        print(line)
    if (rd / "report.md").exists():
        print(f"report: {rd / 'report.md'}")


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def cmd_down(*, yes: bool, cluster: str | None) -> None:
    # A damaged clusters.json must not stop `down` from tearing down what SkyPilot itself lists: with no
    # record to trust, every nanochat cluster and managed job SkyPilot has counts as unrecorded.
    damaged = None
    try:
        clusters = state.load_clusters()
    except NanochatError as e:
        clusters, damaged = {}, e
    unrecorded = discovered_unrecorded(set(clusters))
    if damaged is not None and not unrecorded:
        raise NanochatError(f"{damaged}; SkyPilot lists no nanochat cluster or managed job to tear down")
    if cluster is not None:
        clusters = {k: v for k, v in clusters.items() if k == cluster}
        unrecorded = [d for d in unrecorded if d["name"] == cluster]
    if not clusters and not unrecorded:
        print("nothing to tear down: no clusters are recorded" + (f" under the name '{cluster}'" if cluster else "")
              + " and SkyPilot has no nanochat cluster or managed job running.")
        return
    paid = [c["name"] for c in clusters.values() if c.get("backend") != "local"] + [d["name"] for d in unrecorded]
    if paid:
        confirm("Tear down " + ", ".join(paid) + "? Anything not pulled is lost", yes)
    for d in unrecorded:  # found through SkyPilot itself, not in our records
        sky_backend().SkyBackend().down_discovered(d)
        print(f"down: '{d['name']}' (found through SkyPilot; no local record, so no cost shown)")
    total = 0.0
    now = time.time()
    for name, rec in clusters.items():
        backend = backend_for(rec)
        stopped = backend.down(rec)
        cost = None
        if rec.get("backend") != "local" and not rec.get("spot"):
            # SkyPilot's cost report covers clusters it launched directly, never managed-job (spot) nodes.
            cost = backend.final_cost(rec)
        if cost is None:
            cost = cluster_summary(rec, now)["spent"]
        total += cost
        state.remove_cluster(name)
        extra = f" (stopped run {', '.join(stopped)})" if stopped else ""
        print(f"down: '{name}'{extra}; final cost ${cost:.2f}")
    if len(clusters) > 1:
        print(f"total: ${total:.2f}")
    sys.stdout.flush()
    if damaged is not None:   # what SkyPilot lists is down; the file still needs the user's attention
        raise NanochatError(f"{damaged}; what SkyPilot lists was torn down")
