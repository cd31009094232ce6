"""
The multi-step commands: up, train, logs. (status, pull, eval, down live in commands/manage.py.)
Each function here is what one `nanochat <command>` does after Typer parsed its options.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from nanochat_core.common import NanochatError, TRAINED_STAGES, parse_event
from nanochat_core.run_spec import RunSpec, job_price, spend_cap, spent
from nanochat_core.run_spec import write as write_spec
from nanochat_cli import state
from nanochat_cli.backends.base import backend_for, sky_backend
from nanochat_cli.planning.offers import failover_candidates
from nanochat_cli.planning.planner import AUTOSTOP_MIN, MARGIN_H, capability, parse_budget, limit_failover, make_plan
from rich.console import Console
import typer
from rich.table import Table
from nanochat_core.gpt.model_config import config_for_depth, count_params, check_depth
from nanochat_core.stages.pipeline import DEFAULT_STAGES, LOCAL_BASE_MINUTES, LOCAL_BASE_STEPS, LOCAL_MODEL, parse_stages
from nanochat_cli.planning.cost import CostMeter
from nanochat_cli.backends.task_files import USER_DATA_MOUNT, BUCKET_DATA_MOUNT
from nanochat_core.data import user_data
from nanochat_core.data.dataset import load_sources

LOCAL_OFFER = {"cloud": "local", "region": "-", "instance_type": platform.node() or "this-machine",
               "accelerators": "cpu", "spot": False, "price_per_hour": 0.0, "interconnect": "n/a",
               "enabled": True}
SPOT_NEEDS_BUCKET = ("a spot run's node is gone when its job ends or is preempted, so its checkpoints must live in "
                     "a bucket to resume and to be pulled")
# Seconds kept free at the end of the budget for teardown (the node's job ends before this): the planner's.
TEARDOWN_MARGIN_S = MARGIN_H * 3600


def _console(stderr: bool = False):
    return Console(stderr=stderr, highlight=False)


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise NanochatError(f"{question} - not asked because input is not a terminal; add --yes to confirm")
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
    t = Table(title=title, title_justify="left")
    for col in ("#", "cloud", "region", "instance", "GPUs", "spot", "$/h", "interconnect", "enabled"):
        t.add_column(col, justify="right" if col in ("#", "$/h") else "left")
    for i, o in enumerate(offers, 1):
        t.add_row(str(i), o["cloud"], o["region"], o["instance_type"], o["accelerators"],
                  "yes" if o["spot"] else "no", f"{o['price_per_hour']:.2f}", o["interconnect"],
                  "[green]yes[/]" if o["enabled"] else "[dim]no[/]")
    return t


def rank(gpus, spot, clouds, allow_pcie, max_price, json_out, notes: bool = True, nodes: int = 1):
    err = _console(stderr=True)
    # Importing SkyPilot and reading (on first use: downloading) every cloud's catalog takes seconds.
    with err.status("reading cloud price catalogs..."):
        result = sky_backend().rank_offers(gpus, clouds=split_clouds(clouds), spot=spot, allow_pcie=allow_pcie,
                                         max_price=max_price)
    for note in result.notes if notes else []:
        err.print(f"[dim]note: {note}[/]", soft_wrap=True)
    if not json_out:
        out = _console()
        if not out.is_terminal:
            out.width = max(out.width, 160)  # piped or redirected: whole rows, never cut at 80 columns
        per_node = f"; $/h per node, {nodes} nodes cost {nodes}x" if nodes > 1 else ""
        out.print(offers_table(result.offers[:25], f"{gpus} offers, cheapest first"
                               + (" (spot prices)" if spot else "") + per_node))
        if len(result.offers) > 25:
            print(f"... {len(result.offers) - 25} more (use --json for all)")
    if notes and result.offers and not any(o["enabled"] for o in result.offers):
        # Every row says "enabled: no": nothing here can be launched until a cloud has credentials.
        err.print(f"[yellow]next: no cloud has credentials on this machine, so none of these can be launched "
                  f"yet; {sky_backend().ENABLE_HINT} (README: Running on a real cloud)[/]", soft_wrap=True)
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
        raise NanochatError("spot runs provision their own node: run `nanochat train --spot --budget USD "
                            "--bucket s3://BUCKET` (`nanochat up --spot --dryrun` shows the spot offers)")
    result = rank(gpus, spot, clouds, allow_pcie, max_price, json_out, nodes=nodes)
    if json_out:
        print(json.dumps({"offers": result.offers}))
    if dryrun:
        if spot:
            print(f"note: to run on these: `nanochat train --spot --budget USD --bucket s3://BUCKET`; "
                  f"{SPOT_NEEDS_BUCKET}", file=sys.stderr)
        return
    offer = sky_backend().choose(result, spot=spot, max_price=max_price)
    existing = state.get_cluster(name)
    if existing and existing.get("backend") == "sky":
        raise NanochatError(f"cluster '{name}' is already up; `nanochat train` uses it, "
                            f"`nanochat down --cluster {name}` removes it, --cluster picks another name")
    confirm(f"Provision {nodes} x {offer['instance_type']} on {offer['cloud']} ({offer['region']}) at "
            f"${job_price(offer['price_per_hour'], nodes):.2f}/h?", yes)
    rec = state.new_cluster_record(name, "sky", offer, nodes=nodes, spot=spot, autostop_minutes=autostop)
    rec["candidates"] = failover_candidates(result, offer)
    state.save_cluster(rec)  # before the provisioning request: a failure or Ctrl-C never leaves it unrecorded
    sky_backend().SkyBackend().provision(rec)
    if not json_out:
        print(f"cluster '{name}' is up: {offer['cloud']} {offer['instance_type']} ${rec['price_per_hour']:.2f}/h; "
              f"it tears itself down after {autostop} idle minutes. Next: `nanochat train --budget 100`")


# -----------------------------------------------------------------------------
# train

@dataclass(frozen=True)
class TrainFlags:
    """`nanochat train`'s options as Typer parsed them: one record from main.py to the flow."""
    budget: str = "100"
    depth: int | None = None
    local: bool = False
    spot: bool = False
    detach: bool = False
    dryrun: bool = False
    json_out: bool = False
    yes: bool = False
    name: str | None = None
    gpus: str = "H100:8"
    clouds: str | None = None
    nodes: int = 1
    cluster: str | None = None
    keep: bool = False
    steps: int | None = None
    minutes: float | None = None
    data: str | None = None
    bucket: str | None = None
    stages: str | None = None
    chat_data: str | None = None         # your own data (the section at the end of this file)
    identity: str | None = None
    chat_share: float | None = None
    skip_bad: bool = False


def _local_spec(f: TrainFlags, stages: str | None) -> RunSpec:
    """A free run on this machine: the local preset's model and an estimate of each stage's minutes."""
    from nanochat_core.training.loop import CPU_TOKENS_PER_MICRO_STEP   # lazy: loads torch, which `nanochat --help` must not
    names = (stages or DEFAULT_STAGES["local"]).split(",")
    # Estimates for an idle 2-core CPU, never limits: the local preset trains a fixed number of steps (unless
    # --minutes asks for a time-bounded base), so a busy machine takes longer and ends with the same model.
    # preflight: the toy-size checks take ~35 s on a CPU (docs/PERFORMANCE.md)
    base_steps = f.steps or (None if f.minutes else LOCAL_BASE_STEPS)
    base_min = f.minutes or LOCAL_BASE_MINUTES * (base_steps or LOCAL_BASE_STEPS) / LOCAL_BASE_STEPS
    est_min = {"preflight": 0.6, "tok": 0.5, "base": base_min, "mid": 1.0, "sft": 1.0,
               "rl": 1.0, "eval": 1.0, "report": 0.1}
    m = {**LOCAL_MODEL, "depth": f.depth or LOCAL_MODEL["depth"]}
    params = count_params(config_for_depth(m["depth"], m["vocab_size"], sequence_len=m["sequence_len"],
                                           head_dim=m["head_dim"]))["total"]
    # (CPU base training's batch is one micro-step of CPU_TOKENS_PER_MICRO_STEP tokens: base_train.make_plan)
    tokens = base_steps * CPU_TOKENS_PER_MICRO_STEP if base_steps else None
    return RunSpec(run=f.name or "local", preset="local", offer=dict(LOCAL_OFFER), depth=m["depth"],
                   params=params, tokens=tokens, hours=round(sum(est_min[s] for s in names) / 60, 3),
                   stages=[{"name": s, "hours": round(est_min[s] / 60, 3), "cost": 0.0} for s in names],
                   pipeline_stages=stages, steps=f.steps, minutes=f.minutes, data=f.data)


def _print_plan(spec: RunSpec) -> None:
    o = spec.offer
    c = _console()
    c.print(f"[bold]Plan:[/] depth {spec.depth} on {o['cloud']} {o['region']} {o['instance_type']} "
            f"({o['accelerators']}{', spot' if o['spot'] else ''}) at ${o['price_per_hour']:.2f}/h")
    t = Table()
    t.add_column("stage")
    t.add_column("hours", justify="right")
    t.add_column("cost", justify="right")
    for s in spec.stages:
        t.add_row(s["name"], f"{s['hours']:.2f}", f"${s['cost']:.2f}")
    t.add_row("[bold]total", f"[bold]{spec.hours:.2f}", f"[bold]${spec.cost:.2f}")
    c.print(t)
    if spec.preset == "local" and spec.tokens:   # a fixed amount of training, its time an estimate
        c.print(f"model: {spec.params / 1e6:,.1f}M params, {spec.tokens:,} base-training tokens; about "
                f"{spec.hours * 60:.0f} min on an idle 2-core CPU (an estimate: a busier machine takes longer and "
                "trains the same model)")
    elif spec.params and spec.tokens:
        c.print(f"model: {spec.params / 1e6:,.0f}M params, {spec.tokens / 1e9:.2f}B training tokens; "
                f"throughput {spec.tokens_per_sec:,.0f} tok/s ({spec.throughput_source})")
        c.print(f"what it will be able to do, roughly: {capability(spec.depth)}")
        c.print("the hours rest on that throughput, an estimate until this code is measured on this GPU: the node's "
                "preflight measures it first and stops a run that gets under half of it; a run slower than planned "
                "trains fewer tokens, within the same cap")
    elif spec.params:
        c.print(f"model: {spec.params / 1e6:,.1f}M params, trained for as many steps as fit the time")
    if spec.expected_core is not None:
        c.print(f"the anchor scored CORE {spec.expected_core:.4f} at this size ({spec.expected_core_source})")
    if spec.controller_per_hour:
        c.print(f"spot: the price includes ${spec.controller_per_hour:.2f}/h for SkyPilot's jobs controller (a small "
                "VM that runs the managed job and stops itself 10 idle minutes after it; its disk bills cents a day "
                "until `sky down`), and the plan reserves time for a preemption and a restart after an error")
    for note in (spec.capped_note, spec.setup_note):
        if note:
            c.print(f"note: {note}")
    if spec.budget:
        # What the node enforces, in dollars and in time: the budget, or a capped plan's own cap (the note above).
        base = (f"base training stops {spec.base_deadline_hours:.2f} h after launch, "
                if any(s["name"] == "base" for s in spec.stages) else "")
        c.print(f"budget: ${spec.budget:.2f}; at most ${spec.spend_cap:.2f} will be spent ({base}everything "
                f"{spec.deadline_hours:.2f} h after launch, then {spec.margin_hours * 60:.0f} min of teardown "
                f"margin; priced at up to ${spec.max_price_per_hour:.2f}/h, the dearest offer the launch may fail "
                f"over to)")
        c.print("not in the price: the node's disk where the cloud bills disks separately, a --bucket's storage and "
                "requests, and data leaving the cloud (`nanochat pull`); your cloud bills those on its own")


def cmd_train(f: TrainFlags) -> None:
    """`nanochat train`: check the flags, choose where to run (this machine, a recorded cluster or the
    cheapest offer), build the run spec within the budget, then launch it and follow its log."""
    budget_usd = parse_budget(f.budget)
    stages = _check_train_flags(f.depth, f.local, f.nodes, f.bucket, f.stages)
    mine = prepare_your_data(f.data, f.chat_data, f.identity, f.skip_bad, f.chat_share, f.local, f.bucket)
    candidates = None
    if f.local:
        spec = _local_spec(f, stages)
        rec = None if f.dryrun else local_cluster()
    else:
        rec, offer, candidates = choose_offer(f)
        spec, candidates = plan_cloud_run(rec, offer, candidates, budget_usd, f, stages,
                                          upload_hours=mine.upload_hours)
    spec = mine.annotate(spec, f.local)
    if f.spot and not f.bucket and not f.local and f.dryrun:   # planned all the same; say what the real run needs
        print(f"note: the real run needs --bucket s3://... (or gs://...): {SPOT_NEEDS_BUCKET}", file=sys.stderr)
    if f.json_out and f.dryrun:
        print(json.dumps(spec.to_json()))
        return
    if f.spot and not f.bucket and not f.local and not f.dryrun:
        # A spot run's node is removed when its job ends (and replaced after a preemption): without a bucket
        # nothing it trained could ever be pulled, nor resumed. Refused before anything is paid for.
        raise NanochatError("--spot needs --bucket s3://... (or gs://...): a spot run's node is gone when its job "
                            "ends or is preempted, so its checkpoints must live in a bucket to resume and to be "
                            "pulled")
    if not f.json_out:
        _print_plan(spec)
        for line in mine.lines(spec):
            _console().print(line)
    if f.dryrun:
        return
    launch_and_follow(rec, spec, candidates, f)


def _check_train_flags(depth, local, nodes, bucket, stages) -> str | None:
    """One-line refusals before anything is chosen or paid for; returns --stages normalised."""
    if stages is not None:
        stages = ",".join(parse_stages(stages))
    if depth is not None:
        check_depth(depth)
    if bucket and not local:
        from nanochat_cli.backends.bucket import parse   # lazy: only the commands that need it load it
        parse(bucket)  # a scheme we can mount and pull from, refused now rather than on the node
    if nodes > 1 and not bucket and not local:
        # Refused here, before anyone pays for N nodes' setup: every node writes its optimizer shards and
        # reads the others' checkpoints, which only a shared bucket makes possible.
        raise NanochatError(f"--nodes {nodes} needs --bucket s3://... (or gs://...): the nodes share "
                            "checkpoints through it")
    return stages


def _reusable(rec: dict, ask: bool) -> bool:
    """May `train` put a new job on this recorded cluster? Not when SkyPilot says it is gone: its node tore
    itself down (autodown), and reusing the record would bill a re-provisioned node against an old one's
    start and leave it without a teardown on failure. Unknown (SkyPilot cannot be asked; a dry run does not
    start a local API server just to ask) counts as usable: a real launch asks again before it provisions,
    and tears down on failure whatever it made."""
    return _sky_state(rec, ask) != "DOWN"


def _sky_state(rec: dict, ask: bool = True) -> str:
    try:
        return sky_backend().SkyBackend().cluster_state(rec, start_server=ask)
    except NanochatError:
        return "UNKNOWN"


def choose_offer(f: TrainFlags):
    """Where a cloud run goes: (cluster record or None, offer priced per node, failover candidates)."""
    candidates = None
    if f.cluster:
        rec = state.get_cluster(f.cluster)
        if rec is None:
            raise NanochatError(f"no cluster named '{f.cluster}': `nanochat status` lists them, "
                                "`nanochat up` makes one")
        if rec.get("backend") != "sky":
            raise NanochatError(f"cluster '{f.cluster}' is this machine: use `nanochat train --local`")
        if not _reusable(rec, ask=not f.dryrun):
            raise NanochatError(f"cluster '{f.cluster}' is gone (SkyPilot reports it DOWN): `nanochat down "
                                f"--cluster {f.cluster}` clears its record and shows what it cost; then train "
                                "without --cluster")
    else:  # the most recent on-demand cloud cluster that is still there, if any; otherwise pick an offer now.
        # A spot record is never reused: each spot run is its own managed job on its own node, priced at spot.
        ours = [r for r in state.load_clusters().values() if r.get("backend") == "sky" and not r.get("spot")]
        ours = sorted(ours, key=lambda r: r.get("launched_at", 0), reverse=True)
        rec = next((r for r in ours if _reusable(r, ask=not f.dryrun)), None)
    if rec is not None and f.spot and not rec.get("spot"):
        raise NanochatError(f"cluster '{rec['name']}' is on-demand and a --spot run brings its own node: "
                            f"`nanochat down --cluster {rec['name']}` first, or train on it without --spot")
    if rec is not None and f.keep and not f.dryrun:
        why = sky_backend().budget_unsafe({**rec["offer"], **rec.get("launched", {})}, bool(rec.get("spot")), True)
        if why:
            raise NanochatError(f"--keep needs a node that can stop itself, and cluster '{rec['name']}' cannot "
                                f"({why}): train without --keep, or on another cluster")
    if rec is not None:
        nodes = rec.get("nodes", f.nodes)
        # What SkyPilot actually launched (read back after a failover), at the price it actually costs.
        offer = {**rec["offer"], **rec.get("launched", {}),
                 "price_per_hour": float(rec.get("price_per_hour") or job_price(rec["offer"]["price_per_hour"],
                                                                                  nodes)) / nodes}
    else:
        # quiet ranking (no table, no notes about offers): the plan is what train shows
        result = rank(f.gpus, f.spot, f.clouds, False, None, json_out=True, notes=False)
        _only_budget_safe(result, f)
        try:
            offer = sky_backend().choose(result, spot=f.spot, max_price=None)
        except NanochatError as e:
            if not f.dryrun:
                raise
            # A dry run needs no credentials: plan on the cheapest offer anywhere, and say why.
            offer = result.offers[0]
            print(f"note: {e}\nnote: planning on the cheapest offer anyway ({offer['cloud']})", file=sys.stderr)
        candidates = failover_candidates(result, offer)
    return rec, offer, candidates


def _only_budget_safe(result, f: TrainFlags) -> None:
    """Keep only offers whose node can end its own billing when the job ends: tear itself down, or with --keep
    stop itself (SkyPilot's feature table per cloud). Said in one line when that leaves nothing."""
    unsafe = {}
    for o in result.offers:
        why = sky_backend().budget_unsafe(o, f.spot, f.keep)
        if why:
            unsafe.setdefault(o["cloud"], why)
    if not unsafe:
        return
    kept = [o for o in result.offers if o["cloud"] not in unsafe]
    what = "stop itself (--keep)" if f.keep else "tear itself down when its job ends"
    if not kept:
        raise NanochatError(f"no offer's node can {what}: {'; '.join(f'{c}: {w}' for c, w in unsafe.items())}"
                            + (" - train without --keep" if f.keep else ""))
    print(f"note: left out {', '.join(sorted(unsafe))}: a node there cannot {what}", file=sys.stderr)
    result.offers[:] = kept


def plan_cloud_run(rec, offer, candidates, budget_usd, f: TrainFlags, stages,
                   upload_hours: float = 0.0) -> tuple[RunSpec, list[dict]]:
    """The run spec within what is left of the budget, and the failover candidates it keeps. With
    --stages preflight the node runs only its preflight stage, at the depth the budget would train."""
    nodes = rec.get("nodes", f.nodes) if rec is not None else f.nodes
    # The budget caps what the cluster costs in all: time it has already been up counts against it.
    already = cluster_spent(rec, time.time()) if rec is not None else 0.0
    if already >= budget_usd:
        raise NanochatError(f"cluster '{rec['name']}' has already cost ${already:.2f} of the ${budget_usd:.2f} "
                            "budget: raise --budget, or `nanochat down` and start afresh")
    # A spot run's managed job keeps SkyPilot's jobs controller up on one of its clouds: part of its price.
    controller = sky_backend().controller_price(sorted({c["cloud"] for c in candidates or [offer]})) if f.spot else 0.0
    p = make_plan(offer, budget_usd - already, f.depth, nodes, setup_extra_h=upload_hours,
                  controller_per_hour=controller)
    if stages == "preflight":
        p.preflight_only()
    # Only offers at which this very plan stays within the budget may be failed over to; the dearest
    # of them sets the node's deadlines (so whichever one SkyPilot launches, the cap holds).
    candidates = limit_failover(p, [offer] if rec is not None else candidates)
    d = p.to_json()
    spec = RunSpec(
        run=f.name or f"d{p.depth}", preset="cloud", offer=p.offer, depth=p.depth, nodes=nodes,
        price_per_hour=p.price_per_hour, max_price_per_hour=p.max_price_per_hour, budget=budget_usd,
        # The hard cap on the whole cluster's cost: what it has already cost plus the most this plan may spend.
        spend_cap=spend_cap(budget_usd, already, p.spend_cap), pipeline_stages=stages, bucket=f.bucket,
        spot=f.spot, controller_per_hour=p.controller_per_hour, keep=f.keep, num_shards=p.num_shards, data=f.data,
        steps=f.steps, minutes=f.minutes,
        planned_tokens_per_sec=p.tokens_per_sec / max(1, p.gpus * nodes),
        **{k: d[k] for k in ("hours", "cost", "stages", "deadline_hours", "base_deadline_hours", "margin_hours",
                             "capped_note", "setup_note", "params", "tokens", "tokens_per_sec", "throughput_source",
                             "expected_core", "expected_core_source")})
    return spec, candidates


def _rerun_note(rd: Path) -> str | None:
    """What starting an existing run again does. "Finished" only when its last stage (report) is recorded done
    and it left no outcome (outcome.json: cut short by its budget, failed or stopped); MANIFEST.sha256 alone
    proves nothing, it is written after every stage. A run that never recorded a stage but whose job was seen
    ending (`.job.json`) did not finish either."""
    done = state.read_json(rd / "stages.json") or {}
    outcome = state.read_json(rd / "outcome.json") or {}
    last = (state.read_job(rd) or {}).get("state")
    if not done and not outcome and last in (None, "SUCCEEDED"):
        return None
    if "report" in done and not outcome:
        return (f"run '{rd.name}' already finished; running it again skips every finished stage. "
                "Use --name NEW for a fresh run.")
    why = (f" ({outcome.get('state')}: {outcome.get('why')})" if outcome.get("state")
           else f" (last seen {last})" if last else "")
    return (f"run '{rd.name}' did not finish{why}; continuing it: finished stages "
            f"({', '.join(done) or 'none'}) are skipped, the rest resumes")


def cluster_spent(rec: dict, now: float) -> float:
    """What a recorded cluster has cost so far, at its recorded price since launch (until it ended)."""
    from nanochat_cli.commands.manage import billing_end   # lazy: only the commands that need it load it
    return spent(float(rec.get("price_per_hour") or 0.0), float(rec.get("launched_at") or now),
                 billing_end(rec, now))


def launch_and_follow(rec, spec: RunSpec, candidates, f: TrainFlags) -> None:
    """Record, launch and (unless detached) stream the run; the spec's deadlines start counting here."""
    rd = state.run_dir(spec.run)
    note = _rerun_note(rd)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if not f.local:
        confirm(f"Launch run '{spec.run}' (about ${spec.cost:.2f}, hard cap ${spec.spend_cap:.2f})?", f.yes)
    # The budget (or a capped plan's own cap) is a hard cap: the plan's deadlines count from now (an
    # existing cluster's earlier uptime was already taken off the budget the plan was made with); the node
    # enforces exactly these two moments - base training stops at the first, the whole job at the second.
    now = time.time()
    spec = spec.launched(now)
    rd.mkdir(parents=True, exist_ok=True)
    spec_file = write_spec(rd, spec)   # the one copy of the spec; the node gets this very file
    launch_rec = rec
    if not f.local:
        # Any launch that makes a node tears it down when it fails: a new record, and also a recorded cluster
        # that is not up now (SkyPilot provisions it again, and sets autostop only after setup succeeds).
        created = rec is None or _sky_state(rec) not in ("UP", "UNKNOWN")
        if rec is None:
            rec = state.new_cluster_record(f"nanochat-{spec.run}", "sky", spec.offer, nodes=spec.nodes,
                                           spot=spec.spot, budget=spec.spend_cap, autostop_minutes=AUTOSTOP_MIN,
                                           controller_per_hour=spec.controller_per_hour)
            rec["launched_at"] = now
        # The record's budget is the cap the node enforces, so `status` counts "budget left" down from it.
        rec.update(budget=spec.spend_cap, keep=spec.keep, bucket=spec.bucket, candidates=candidates, ended_at=None,
                   ends_by=spec.deadline_at + TEARDOWN_MARGIN_S, max_price_per_hour=spec.max_price_per_hour,
                   autostop_minutes=AUTOSTOP_MIN, runs=sorted(set(rec.get("runs", []) + [spec.run])))
        # Recorded BEFORE the first provisioning request: whatever happens next (a failed setup, Ctrl-C, a
        # closed laptop), `nanochat status` and `nanochat down` know this cluster may exist and bill.
        state.save_cluster(rec)
        launch_rec = {**rec, "created_by_this_launch": created}   # only a cluster this launch made is torn down
    job = backend_for(rec).launch(launch_rec, rd, spec.node_args(), spec_file)
    if f.local:   # a cloud record already got these fields before the launch
        state.update_cluster(rec["name"], runs=sorted(set(rec.get("runs", []) + [spec.run])), budget=None)
    state.save_log_cursor(rd, rec["backend"], job.get("cursor"))   # a relaunch shows this job's output only
    if f.json_out:
        print(json.dumps({"run": spec.run, "run_dir": str(rd), "cluster": rec["name"], "job_id": job["job_id"]}))
    else:
        print(f"run '{spec.run}' started on '{rec['name']}' (job {job['job_id']}); results in {rd}")
    if f.detach or f.json_out:
        print(f"`nanochat logs --name {spec.run}` attaches to it; `nanochat down` stops it.", file=sys.stderr)
        return
    final = stream_run(rd)
    if final == "BUDGET_TRUNCATED":
        print_finish(rd, f.local)
        raise NanochatError(f"run '{rd.name}' was cut short by its budget (see the log above); what it trained is "
                            f"kept: `nanochat pull --name {rd.name}`, or rerun with a larger --budget to continue it")
    if final in ("FAILED", "CANCELLED"):
        raise NanochatError(f"run '{rd.name}' {final.lower()}; the log above says why. The same command resumes "
                            "it (finished stages are skipped)")
    if final == "SUCCEEDED":
        print_finish(rd, f.local)


def last_sample(rd: Path) -> str | None:
    """The last sample the run logged from its most finished model: a chat stage's if any, else base's."""
    best: dict[str, str] = {}
    try:
        with open(rd / "pipeline.log", encoding="utf-8", errors="replace") as f:
            for line in f:
                ev = parse_event(line)
                if ev and ev.get("event") == "sample" and ev.get("text"):
                    best[str(ev.get("stage"))] = str(ev["text"])
    except OSError:
        return None
    return next((best[s] for s in TRAINED_STAGES if s in best), None)


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
    from nanochat_cli.stream import RunView, resilient, watch   # lazy: only the commands that need it load it
    job = state.read_job(rd)
    if not job:
        raise NanochatError(f"run '{rd.name}' has no job yet: start it with `nanochat train`")
    cluster = state.get_cluster(job.get("cluster")) or {"name": job.get("cluster"), "backend": job["backend"],
                                                        "price_per_hour": 0.0, "launched_at": time.time()}
    spec = state.read_spec(rd)
    backend = backend_for(cluster)
    # The meter counts down from the cap the node enforces: the budget, or a capped plan's own cap.
    meter = CostMeter(price_per_hour=float(cluster.get("price_per_hour") or 0.0),
                      started_at=float(cluster.get("launched_at") or time.time()),
                      budget=spec and (spec.spend_cap or spec.budget),
                      planned_stages={s["name"]: s["hours"] for s in (spec.stages if spec else []) if s.get("hours")})
    view = RunView(meter, title=f"nanochat · {rd.name} on {cluster['name']}",
                   run_started_at=job.get("submitted_at"))
    pos = None if from_start else state.log_cursor(rd, backend.name)
    err = _console(stderr=True)

    def on_retry(e: Exception, n: int) -> None:
        err.print(f"[yellow]log connection dropped ({type(e).__name__}); reconnecting (attempt {n})...[/]")

    lines = resilient(lambda p: backend.tail(cluster, rd, p, follow=follow_on), pos, on_retry=on_retry)
    console = _console()
    try:
        watch(lines, view, lambda cursor: state.save_log_cursor(rd, backend.name, cursor), console,
              live=console.is_terminal, pos=pos)
    except KeyboardInterrupt:
        err.print(detach_message(rd.name, view.spending()))
        return None
    final = backend.job_state(cluster, rd)
    if final == "SUCCEEDED" and meter.outcome:
        final = meter.outcome  # the job ended cleanly, but the pipeline says how (e.g. cut by its budget)
    if final and final != "RUNNING":
        err.print(f"run '{rd.name}': {final}" + (f" · cluster spend so far ${meter.spent():.2f}"
                                                 if meter.price_per_hour else ""))
    return final


def detach_message(run: str, spending: bool) -> str:
    """After Ctrl-C: the job goes on. Only a priced run "keeps spending"; a local one is $0."""
    if spending:
        return (f"\ndetached: run '{run}' keeps running (and spending). "
                f"Re-attach: `nanochat logs --name {run}` · stop spending: `nanochat down`")
    return (f"\ndetached: run '{run}' keeps running on this machine ($0).\n"
            f"Re-attach: `nanochat logs --name {run}` · stop it: `nanochat down`")


def cmd_logs(*, name, from_start, follow):
    rd = state.find_latest_run(name, nothing="no run to show logs for")
    final = stream_run(rd, from_start=from_start, follow_on=follow)
    job = state.read_job(rd) or {}
    if final == "UNKNOWN" and job.get("backend") == "sky" and not job.get("managed"):
        # SkyPilot can answer a gone cluster's log request with nothing at all: say so instead of exit 0.
        cluster = state.get_cluster(job.get("cluster")) or {"name": job.get("cluster"), "backend": "sky"}
        try:
            gone = backend_for(cluster).cluster_state(cluster) == "DOWN"
        except NanochatError:
            gone = False
        if gone:
            raise NanochatError(f"cluster '{cluster['name']}' of run '{rd.name}' is gone, and its log with it; "
                                f"{rd / 'pipeline.log'} has what was pulled; `nanochat status` shows what is left")
    if final == "FAILED":
        raise NanochatError(f"run '{rd.name}' failed; the log above says why. Run the same `nanochat train` "
                            "again to resume (finished stages are skipped)")


def resolve_checkpoint(path: Path | None) -> Path:
    """What chat, serve, eval and export load: the path given, else the latest run with a trained model."""
    from nanochat_core.inference.chat import find_checkpoint   # lazy: loads torch, which `nanochat --help` must not
    return find_checkpoint(path)


# -----------------------------------------------------------------------------
# Your own data (--data DIR / --chat-data FILE / --identity TEXT): prepared once on this machine
# (nanochat_core/data/user_data.py), then read by the local pipeline in place or uploaded with a cloud run.

# An ESTIMATE of a laptop's upload speed, used to price the upload into the plan's setup (the node bills
# while SkyPilot syncs the files to it). Above MAX_UPLOAD_BYTES we refuse and point to a bucket instead.
UPLOAD_BYTES_PER_S = 10e6
MAX_UPLOAD_BYTES = 5 * 2 ** 30


class YourData:
    """What `nanochat train` was given of the user's own, prepared: the pipeline's flags and the plan's lines."""

    def __init__(self, bundle=None, public: str | None = None, docs_share: float | None = None,
                 chat_share: float | None = None):
        self.bundle, self.public, self.docs_share, self.chat_share = bundle, public, docs_share, chat_share

    @property
    def upload_bytes(self) -> int:
        return self.bundle.size_bytes() if self.bundle else 0

    @property
    def upload_hours(self) -> float:
        return self.upload_bytes / UPLOAD_BYTES_PER_S / 3600

    def pipeline_args(self, local: bool) -> list[str]:
        args = ["--data", BUCKET_DATA_MOUNT if self.bucket_data else self.public] if self.public else []
        if self.bundle is None:
            return args
        where = str(self.bundle.path) if local else USER_DATA_MOUNT
        args += ["--user-data", where, "--user-data-sha256", self.bundle.digest]
        args += ["--docs-share", str(self.docs_share)] if self.docs_share is not None else []
        return args + (["--chat-share", str(self.chat_share)] if self.chat_share is not None else [])

    @property
    def bucket_data(self) -> str | None:
        return self.public if self.public and self.public.startswith(("s3://", "gs://")) else None

    def annotate(self, spec: RunSpec, local: bool) -> RunSpec:
        """The spec with what is uploaded, the pipeline's flags for it, and how many passes over the user's
        documents base training makes (the plan says so)."""
        rec = None
        if self.bundle is not None:
            info = self.bundle.info
            rec = {"path": str(self.bundle.path), "sha256": self.bundle.digest, "bytes": self.upload_bytes,
                   "docs_share": self.docs_share, "chat_share": self.chat_share}
            if info.get("docs"):
                rec["docs_tokens_estimate"] = info["docs"]["estimated_tokens"]
                if spec.tokens:
                    share = self.docs_share if self.docs_share is not None else 1.0
                    rec["docs_epochs"] = round(spec.tokens * share / max(1, info["docs"]["estimated_tokens"]), 2)
            if not local:
                rec["upload_hours"] = round(self.upload_hours, 4)
        # --data reaches the node as these flags only (a public source, a bucket mount, your bundle)
        return replace(spec, data=None, user_data=rec, data_bucket=self.bucket_data,
                       user_args=self.pipeline_args(local))

    def lines(self, spec: RunSpec) -> list[str]:
        rec = spec.user_data
        if not rec:
            return []
        out = []
        if "docs_tokens_estimate" in rec:
            share = f" at a {rec['docs_share']:.0%} share" if rec.get("docs_share") is not None else ""
            reads = (f"; base training reads them {rec['docs_epochs']:g} times over{share} "
                     f"({'epochs: the model will memorise a small corpus' if rec['docs_epochs'] > 4 else 'epochs'})"
                     if "docs_epochs" in rec else f"; the local run trains for time{share}, its log counts the passes")
            out.append(f"your documents: ~{rec['docs_tokens_estimate']:,} tokens (estimated){reads}")
        if "upload_hours" in rec:
            out.append(f"your data: {rec['bytes'] / 1e6:,.1f} MB uploaded with the run (sha256 "
                       f"{rec['sha256'][:12]}..., about {rec['upload_hours'] * 60:.1f} min of setup, counted in the plan)")
        return out


def prepare_your_data(data: str | None, chat_data: str | None, identity: str | None, skip_bad: bool,
                      chat_share: float | None, local: bool, bucket: str | None = None) -> YourData:
    """Parse --data, read and pack the user's documents / conversations / identity once (with a summary),
    and refuse what cannot travel to a node before anything is paid for."""
    spec = user_data.parse_data_spec(data, _is_public_source)
    if chat_share is not None and not 0 < chat_share <= 1:
        raise NanochatError(f"--chat-share must be in (0, 1] (1 = only your conversations), got {chat_share}")
    if chat_share is not None and not chat_data:
        raise NanochatError("--chat-share needs --chat-data FILE")
    if not (spec.docs or chat_data or identity):
        if local and spec.public and spec.public.startswith(("s3://", "gs://")):
            raise NanochatError(f"--data {spec.public}: a bucket of shards is for cloud runs; locally, pass the folder")
        return YourData(public=spec.public)
    if local and spec.public and spec.public.startswith(("s3://", "gs://")):
        raise NanochatError(f"--data {spec.public}: a bucket of shards is for cloud runs; locally, pass the folder")
    ident = user_data.read_identity(identity) if identity else None
    bundle = user_data.build_bundle(spec.docs, chat_data, ident, skip_bad)
    mine = YourData(bundle, spec.public, spec.docs_share, chat_share)
    if not local and mine.upload_bytes > MAX_UPLOAD_BYTES:
        raise NanochatError(
            f"your data is {mine.upload_bytes / 2 ** 30:.1f} GiB packed, more than nanochat uploads from this machine "
            f"({MAX_UPLOAD_BYTES / 2 ** 30:.0f} GiB): copy the prepared shards ({bundle.path}/docs) to a bucket "
            f"(e.g. `aws s3 sync {bundle.path}/docs s3://my-bucket/my-docs`) and train with --data "
            "s3://my-bucket/my-docs (the node mounts it; the last shard is validation)")
    return mine


def _is_public_source(item: str) -> bool:
    """A public corpus (a name from sources.json, a file listing shard URLs, a bucket of shards), as opposed
    to a folder of your own documents."""
    p = Path(item).expanduser()
    if item in load_sources() or item.startswith(("s3://", "gs://")) or p.is_file():
        return True
    if p.is_dir():
        return False
    if "/" in item or item.startswith((".", "~")):
        raise NanochatError(f"--data {item}: no such folder")
    return True   # an unknown name: the pipeline lists the sources it knows


def your_data_args(plan: dict, local: bool) -> list[str]:
    """`nanochat eval` on a run trained on your data: the pipeline's flags for the same bundle (the plan kept
    its path and digest; on the cloud it is mounted again at the same place)."""
    rec = plan.get("user_data") or {}
    if not rec.get("path"):
        return []
    return ["--user-data", rec["path"] if local else USER_DATA_MOUNT, "--user-data-sha256", rec["sha256"]]
