"""
The multi-step commands: up, train, logs. (status, pull, eval, down live in admin.py.)
Each function here is what one `nanochat <command>` does after Typer parsed its options.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

from nanochat_core.common import NanochatError
from nanochat_cli import state
from nanochat_cli.offers import failover_candidates

LOCAL_OFFER = {"cloud": "local", "region": "-", "instance_type": platform.node() or "this-machine",
               "accelerators": "cpu", "spot": False, "price_per_hour": 0.0, "interconnect": "n/a",
               "enabled": True}
# Minutes of idle time after which the cluster tears itself down (the cluster-side safety net).
DEFAULT_AUTOSTOP_MIN = 10
# Seconds kept free at the end of the budget for teardown (the node's job ends before this).
TEARDOWN_MARGIN_S = 300


def sky_backend():
    """The SkyPilot adapter, imported on first use (SkyPilot is the optional `cloud` extra)."""
    try:
        from nanochat_cli import sky_backend as module
    except ImportError as e:
        raise NanochatError(f"SkyPilot is not installed ({e.name or e}): `pip install 'nanochat[cloud]'` for "
                            "cloud commands, or use --local") from None
    return module


def backend_for(cluster: dict):
    if cluster.get("backend") == "local":
        from nanochat_cli.local_backend import LocalBackend
        return LocalBackend()
    return sky_backend().SkyBackend()


def _console(stderr: bool = False):
    from rich.console import Console
    return Console(stderr=stderr, highlight=False)


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise NanochatError(f"{question} - not asked because input is not a terminal; add --yes to confirm")
    import typer
    if not typer.confirm(question, default=False):
        raise NanochatError("cancelled; nothing was started")


def split_clouds(clouds: str | None) -> list[str] | None:
    if not clouds:
        return None
    out = [c.strip().lower() for c in clouds.split(",") if c.strip()]
    if not out:
        raise NanochatError("--clouds needs at least one cloud name, e.g. --clouds aws,gcp")
    return out


def local_cluster(record: bool = True) -> dict:
    """This machine as a cluster; recorded in clusters.json when a job is about to run on it."""
    rec = state.get_cluster(state.LOCAL_CLUSTER)
    if rec is None:
        rec = state.new_cluster_record(state.LOCAL_CLUSTER, "local", dict(LOCAL_OFFER))
        if record:
            state.save_cluster(rec)
    return rec


# -----------------------------------------------------------------------------
# up

def offers_table(offers: list[dict], title: str):
    from rich.table import Table
    t = Table(title=title, title_justify="left")
    for col in ("#", "cloud", "region", "instance", "GPUs", "spot", "$/h", "interconnect", "enabled"):
        t.add_column(col, justify="right" if col in ("#", "$/h") else "left")
    for i, o in enumerate(offers, 1):
        t.add_row(str(i), o["cloud"], o["region"], o["instance_type"], o["accelerators"],
                  "yes" if o["spot"] else "no", f"{o['price_per_hour']:.2f}", o["interconnect"],
                  "[green]yes[/]" if o["enabled"] else "[dim]no[/]")
    return t


def rank(gpus, spot, clouds, allow_pcie, max_price, json_out):
    err = _console(stderr=True)
    # Importing SkyPilot and reading (on first use: downloading) every cloud's catalog takes seconds.
    with err.status("reading cloud price catalogs..."):
        result = sky_backend().rank_offers(gpus, clouds=split_clouds(clouds), spot=spot, allow_pcie=allow_pcie,
                                         max_price=max_price)
    for note in result.notes:
        err.print(f"[dim]note: {note}[/]")
    if not json_out:
        _console().print(offers_table(result.offers[:25], f"{gpus} offers, cheapest first"
                                      + (" (spot prices)" if spot else "")))
        if len(result.offers) > 25:
            print(f"... {len(result.offers) - 25} more (use --json for all)")
    return result


def cmd_up(*, gpus, spot, clouds, nodes, dryrun, json_out, yes, allow_pcie, max_price, name, autostop, local):
    if local:
        rec = local_cluster()
        if json_out:
            print(json.dumps({"offers": [rec["offer"]]}))
        else:
            print(f"cluster '{rec['name']}' is this machine ($0/h); next: `nanochat train --local`")
        return
    if spot and not dryrun:
        # A spot run is a SkyPilot managed job: SkyPilot provisions its node (and a new one after every
        # preemption) when the job starts. A node provisioned here would only idle, and bill, beside it.
        raise NanochatError("spot runs provision their own node: run `nanochat train --spot --budget USD` "
                            "(`nanochat up --spot --dryrun` shows the spot offers)")
    result = rank(gpus, spot, clouds, allow_pcie, max_price, json_out)
    if json_out:
        print(json.dumps({"offers": result.offers}))
    if dryrun:
        return
    offer = sky_backend().choose(result, spot=spot, max_price=max_price)
    existing = state.get_cluster(name)
    if existing and existing.get("backend") == "sky":
        raise NanochatError(f"cluster '{name}' is already up; `nanochat train` uses it, "
                            f"`nanochat down --cluster {name}` removes it, --cluster picks another name")
    confirm(f"Provision {nodes} x {offer['instance_type']} on {offer['cloud']} ({offer['region']}) at "
            f"${offer['price_per_hour'] * nodes:.2f}/h?", yes)
    rec = state.new_cluster_record(name, "sky", offer, nodes=nodes, spot=spot, autostop_minutes=autostop)
    rec["candidates"] = failover_candidates(result, offer)
    sky_backend().SkyBackend().provision(rec)
    state.save_cluster(rec)
    if not json_out:
        print(f"cluster '{name}' is up: {offer['cloud']} {offer['instance_type']} ${rec['price_per_hour']:.2f}/h; "
              f"it tears itself down after {autostop} idle minutes. Next: `nanochat train --budget 100`")


# -----------------------------------------------------------------------------
# train

def _local_plan(depth, steps, minutes) -> dict:
    stages = ["tok", "base", "sft", "eval", "report"]
    est_min = {"tok": 0.5, "base": (minutes or 2.5), "sft": 1.0, "eval": 1.0, "report": 0.1}
    from nanochat_core.model_config import config_for_depth, count_params
    # The local preset's model (pipeline.py: vocab 4096, 64-dim heads, 256-token rows). Tokens depend on
    # how many steps fit in --minutes on this machine, which only the trainer's timed first step knows.
    params = count_params(config_for_depth(depth or 4, 4096, sequence_len=256, head_dim=64))["total"]
    return {"offer": dict(LOCAL_OFFER), "depth": depth or 4, "params": params, "tokens": None,
            "hours": round(sum(est_min.values()) / 60, 3), "cost": 0.0,
            "stages": [{"name": s, "hours": round(est_min[s] / 60, 3), "cost": 0.0} for s in stages]}


def _print_plan(plan: dict, budget: float | None) -> None:
    from rich.table import Table
    o = plan["offer"]
    c = _console()
    c.print(f"[bold]Plan:[/] depth {plan['depth']} on {o['cloud']} {o['region']} {o['instance_type']} "
            f"({o['accelerators']}{', spot' if o['spot'] else ''}) at ${o['price_per_hour']:.2f}/h")
    t = Table()
    t.add_column("stage")
    t.add_column("hours", justify="right")
    t.add_column("cost", justify="right")
    for s in plan["stages"]:
        t.add_row(s["name"], f"{s['hours']:.2f}", f"${s['cost']:.2f}")
    t.add_row("[bold]total", f"[bold]{plan['hours']:.2f}", f"[bold]${plan['cost']:.2f}")
    c.print(t)
    if plan.get("params") and plan.get("tokens"):
        c.print(f"model: {plan['params'] / 1e6:,.0f}M params, {plan['tokens'] / 1e9:.2f}B training tokens; "
                f"throughput {plan.get('tokens_per_sec', 0):,.0f} tok/s ({plan.get('throughput_source', '')})")
    elif plan.get("params"):
        c.print(f"model: {plan['params'] / 1e6:,.1f}M params, trained for as many steps as fit the time")
    if plan.get("expected_core") is not None:
        c.print(f"the anchor scored CORE {plan['expected_core']:.4f} at this size ({plan['expected_core_source']})")
    if budget:
        c.print(f"budget: ${budget:.2f} (hard cap: training stops early to leave room for SFT and evals)")


def _dryrun_json(plan: dict) -> dict:
    keys = ("offer", "depth", "params", "tokens", "hours", "cost", "stages")
    return {k: plan[k] for k in keys}


def cmd_train(*, budget, depth, local, spot, detach, dryrun, json_out, yes, name, gpus, clouds, nodes,
              cluster, keep, steps, minutes, data, bucket, stages=None):
    from nanochat_cli.planner import make_plan, parse_budget
    budget_usd = parse_budget(budget)
    if stages is not None:
        from nanochat_core.pipeline import ALL_STAGES
        chosen = [x.strip() for x in stages.split(",") if x.strip()]
        unknown = [x for x in chosen if x not in ALL_STAGES]
        if not chosen or unknown:
            raise NanochatError(f"--stages takes a comma list from {','.join(ALL_STAGES)}; "
                                f"got '{stages}'")
        stages = ",".join(chosen)
    if depth is not None and not 1 <= depth <= 64:
        raise NanochatError(f"--depth must be between 1 and 64, got {depth}")
    if local:
        plan = _local_plan(depth, steps, minutes)
        rec = None if dryrun else local_cluster()
        run_name = name or "local"
        args = ["--preset", "local"]
    else:
        if cluster:
            rec = state.get_cluster(cluster)
            if rec is None:
                raise NanochatError(f"no cluster named '{cluster}': `nanochat status` lists them, "
                                    "`nanochat up` makes one")
            if rec.get("backend") != "sky":
                raise NanochatError(f"cluster '{cluster}' is this machine: use `nanochat train --local`")
        else:  # the most recent cloud cluster `up` made, if any; otherwise pick an offer now
            ours = [r for r in state.load_clusters().values() if r.get("backend") == "sky"]
            rec = max(ours, key=lambda r: r.get("launched_at", 0)) if ours else None
        if rec is not None and spot and not rec.get("spot"):
            raise NanochatError(f"cluster '{rec['name']}' is on-demand and a --spot run brings its own node: "
                                f"`nanochat down --cluster {rec['name']}` first, or train on it without --spot")
        if rec is not None:
            offer = rec["offer"]
            nodes = rec.get("nodes", nodes)
        else:
            result = rank(gpus, spot, clouds, False, None, json_out=True)  # quiet ranking; the plan is shown
            try:
                offer = sky_backend().choose(result, spot=spot, max_price=None)
            except NanochatError as e:
                if not dryrun:
                    raise
                # A dry run needs no credentials: plan on the cheapest offer anywhere, and say why.
                offer = result.offers[0]
                print(f"note: {e}\nnote: planning on the cheapest offer anyway ({offer['cloud']})", file=sys.stderr)
            candidates = failover_candidates(result, offer)
        # The budget caps what the cluster costs in all: time it has already been up counts against it.
        spent = 0.0
        if rec is not None:
            spent = float(rec.get("price_per_hour") or 0) * max(0.0, time.time() - rec.get("launched_at", 0)) / 3600
            if spent >= budget_usd:
                raise NanochatError(f"cluster '{rec['name']}' has already cost ${spent:.2f} of the ${budget_usd:.2f} "
                                    "budget: raise --budget, or `nanochat down` and start afresh")
        p = make_plan(offer, budget_usd - spent, depth, nodes)
        p.budget = budget_usd
        plan = p.to_json()
        run_name = name or f"d{p.depth}"
        args = ["--preset", "cloud", "--depth", str(p.depth), "--price-per-hour", f"{p.price_per_hour:.4f}",
                "--nnodes", str(nodes), "--planned-tokens-per-sec", f"{p.tokens_per_sec / max(1, p.gpus * nodes):.0f}"]
    if json_out and dryrun:
        print(json.dumps(_dryrun_json(plan)))
        return
    if spot and not bucket and not local:
        print("warning: --spot without --bucket: after a preemption the run restarts on a fresh node without "
              "its checkpoints; add --bucket s3://... (or gs://...) so it resumes", file=sys.stderr)
    if not json_out:
        _print_plan(plan, None if local else budget_usd)
    if dryrun:
        return
    if depth is not None and local:
        args += ["--depth", str(depth)]
    args += ["--steps", str(steps)] if steps else []
    args += ["--minutes", str(minutes)] if minutes else []
    args += ["--data", data] if data else []
    args += ["--stages", stages] if stages else []
    rd = state.run_dir(run_name)
    if (rd / "MANIFEST.sha256").exists():
        print(f"note: run '{run_name}' already finished; running it again skips every finished stage. "
              "Use --name NEW for a fresh run.", file=sys.stderr)
    now = time.time()
    if not local:
        confirm(f"Launch run '{run_name}' (about ${plan['cost']:.2f}, hard cap ${budget_usd:.2f})?", yes)
        # The budget is a hard cap counted from when the cluster started billing: the trainer's deadline
        # leaves room for teardown; the pipeline reserves time for SFT and evals after base training.
        started = rec.get("launched_at", now) if rec is not None else now
        deadline = started + budget_usd / max(plan["price_per_hour"], 1e-9) * 3600 - TEARDOWN_MARGIN_S
        args += ["--deadline-at", f"{deadline:.0f}"]
        plan["deadline_at"] = deadline
    plan.update(budget=None if local else budget_usd, price_per_hour=plan["offer"]["price_per_hour"] * (
        1 if local else nodes), run=run_name, created_at=now, preset="local" if local else "cloud",
        spot=spot, nodes=nodes, keep=keep, bucket=bucket)
    state.write_plan(rd, plan)
    # A relaunch (after a preemption or a failure) appends to the same log: show this job's output only.
    log = rd / "pipeline.log"
    start_pos = log.stat().st_size if log.exists() else 0
    if local:
        backend = backend_for(rec)
        job = backend.launch(rec, rd, args)
    else:
        if rec is None:
            rec = state.new_cluster_record(f"nanochat-{run_name}", "sky", plan["offer"], nodes=nodes, spot=spot,
                                           budget=budget_usd, autostop_minutes=DEFAULT_AUTOSTOP_MIN)
            rec["candidates"] = candidates
        rec.update(budget=budget_usd, keep=keep, bucket=bucket)
        job = sky_backend().SkyBackend().launch(rec, rd, args, plan)
        state.save_cluster(rec)
    state.update_cluster(rec["name"], runs=sorted(set(rec.get("runs", []) + [run_name])), budget=plan["budget"])
    state.save_log_position(rd, start_pos if local else 0)
    if json_out:
        print(json.dumps({"run": run_name, "run_dir": str(rd), "cluster": rec["name"], "job_id": job["job_id"]}))
    else:
        print(f"run '{run_name}' started on '{rec['name']}' (job {job['job_id']}); results in {rd}")
    if detach or json_out:
        print(f"`nanochat logs --name {run_name}` attaches to it; `nanochat down` stops it.", file=sys.stderr)
        return
    final = stream_run(rd)
    if final in ("FAILED", "CANCELLED"):
        raise NanochatError(f"run '{rd.name}' {final.lower()}; the log above says why. The same command resumes "
                            "it (finished stages are skipped)")
    if final == "SUCCEEDED":
        print_finish(rd, local)


def last_sample(rd: Path) -> str | None:
    """The last sample the run logged from its most finished model: a chat stage's if any, else base's."""
    from nanochat_core.common import parse_event
    best: dict[str, str] = {}
    try:
        with open(rd / "pipeline.log", encoding="utf-8", errors="replace") as f:
            for line in f:
                ev = parse_event(line)
                if ev and ev.get("event") == "sample" and ev.get("text"):
                    best[str(ev.get("stage"))] = str(ev["text"])
    except OSError:
        return None
    return next((best[s] for s in ("rl", "sft", "mid", "base") if s in best), None)


def print_finish(rd: Path, local: bool) -> None:
    sample = last_sample(rd)
    if sample:
        print(f"\nsample from your model: {sample.strip()[:300]!r}")
    report = rd / "report.md"
    if report.exists():
        print(f"report: {report}")
    if local:
        print("next: `nanochat chat` to talk to it (or `nanochat serve` for the web UI)")
    else:
        print(f"next: `nanochat pull --name {rd.name}`, then `nanochat chat`; `nanochat down` stops the spending")


# -----------------------------------------------------------------------------
# logs

def stream_run(rd: Path, from_start: bool = False, follow_on: bool = True) -> str | None:
    """Stream a run's log with the live panel until it ends or the user detaches (Ctrl-C).
    Returns the job's final state."""
    from nanochat_cli.cost import CostMeter
    from nanochat_cli.stream import RunView, resilient, watch
    job = state.read_job(rd)
    if not job:
        raise NanochatError(f"run '{rd.name}' has no job yet: start it with `nanochat train`")
    cluster = state.get_cluster(job.get("cluster")) or {"name": job.get("cluster"), "backend": job["backend"],
                                                        "price_per_hour": 0.0, "launched_at": time.time()}
    plan = state.read_json(rd / "plan.json") or {}
    backend = backend_for(cluster)
    meter = CostMeter(price_per_hour=float(cluster.get("price_per_hour") or 0.0),
                      started_at=float(cluster.get("launched_at") or time.time()), budget=plan.get("budget"),
                      planned_stages={s["name"]: s["hours"] for s in plan.get("stages", []) if s.get("hours")})
    view = RunView(meter, title=f"nanochat · {rd.name} on {cluster['name']}",
                   run_started_at=job.get("submitted_at"))
    pos = 0 if from_start else state.log_position(rd)
    err = _console(stderr=True)

    def on_retry(e: Exception, n: int) -> None:
        err.print(f"[yellow]log connection dropped ({type(e).__name__}); reconnecting (attempt {n})...[/]")

    lines = resilient(lambda p: backend.tail(cluster, rd, p, follow=follow_on), pos, on_retry=on_retry)
    console = _console()
    try:
        watch(lines, view, rd, console, live=console.is_terminal, pos=pos)
    except KeyboardInterrupt:
        err.print(f"\ndetached: run '{rd.name}' keeps running (and spending). "
                  f"Re-attach: `nanochat logs --name {rd.name}` · stop spending: `nanochat down`")
        return None
    final = backend.job_state(cluster, rd)
    if final and final != "RUNNING":
        err.print(f"run '{rd.name}': {final}" + (f" · cluster spend so far ${meter.spent():.2f}"
                                                 if meter.price_per_hour else ""))
    return final


def cmd_logs(*, name, from_start, follow):
    rd = state.find_run_for_logs(name)
    final = stream_run(rd, from_start=from_start, follow_on=follow)
    if final == "FAILED":
        raise NanochatError(f"run '{rd.name}' failed; the log above says why. Run the same `nanochat train` "
                            "again to resume (finished stages are skipped)")


def resolve_checkpoint(path: Path | None) -> Path:
    if path is not None:
        if not path.exists():
            raise NanochatError(f"checkpoint {path} does not exist")
        return path
    for rd in state.list_runs():
        if any((rd / stage).is_dir() for stage in ("rl", "sft", "mid", "base")):
            return rd
    raise NanochatError("no trained model found: run `nanochat train --local` (a few minutes, $0) "
                        "or `nanochat pull` to bring a cloud run home")
