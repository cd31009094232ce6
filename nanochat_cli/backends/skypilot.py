"""
The SkyPilot adapter: the ONLY module that imports `sky` (and it is imported only by commands that need
a cloud, so `nanochat --help` never pays for it). Offers, launch, managed-job launch, log tail, status,
cost report, pull, down - the same surface as local_backend.LocalBackend.

Offers come from SkyPilot's own catalog (sky.catalog.list_accelerators, every region) and the final pick
from SkyPilot's real optimizer (sky.optimizer.Optimizer over the candidates we allow), so prices and
availability rules are SkyPilot's; what we add is the interconnect rule and the budget.

The interconnect rule and the offer records live in offers.py (pure, no sky).
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import io
import logging
import math
import os
import queue
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import sky  # noqa: the one place
# `import sky` loads these submodules already (measured: the same 1.5 s with or without them)
from sky import backends as sky_backends
from sky import check as sky_check
from sky import clouds as sky_clouds
from sky import exceptions
from sky.catalog import common as catalog_common
from sky.client import sdk as sky_sdk
from sky.clouds import cloud as sky_cloud
from sky.jobs.constants import CONTROLLER_RESOURCES
from sky.optimizer import Optimizer
from sky.server import common as server_common
from sky.skylet.autostop_lib import AutostopCodeGen, AutostopWaitFor

from nanochat_core.common import NanochatError
from nanochat_core import run_spec
from nanochat_core.run_spec import job_price
from nanochat_cli import pull as pull_mod
from nanochat_cli.planning.offers import GPU_CLOUDS, Offers, interconnect, parse_gpus
from nanochat_cli import state
from nanochat_cli.backends.sky_replies import ANSI, already_gone, sky_error, job_state_name, record_managed_price
from nanochat_cli.backends.task_files import BUCKET_MOUNT, NODE_RUNS, bucket_runs, data_mounts, workdir, yaml_path
from nanochat_cli.backends.base import start_of
from nanochat_cli.planning.planner import AUTOSTOP_MIN, SETUP_GUARD_MIN, SPOT_RESTARTS_ON_ERRORS
import sys
import signal

# Clouds whose catalogs list GPUs (SkyPilot 0.14). Kubernetes/SSH pools need a running cluster: not offered.
ENABLE_HINT = ("enable one, e.g. `aws configure`, `gcloud auth application-default login`, a Lambda key in "
               "~/.lambda_cloud/lambda_keys or `nebius` CLI login, then run `sky check`")
REMOTE_SPECS = "~/.nanochat/specs"   # where each run's spec file lands on the node


@contextlib.contextmanager
def _quiet():
    """SkyPilot prints spinners and warnings meant for its own CLI; ours shows the result instead."""
    logger = logging.getLogger("sky")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(old)


class _PlainStderr(io.TextIOBase):
    """Where SkyPilot's launch output goes: stderr (stdout carries our results and --json), without colour
    codes when stderr is not a terminal (a pipe, a log file)."""

    def write(self, s: str) -> int:
        err = sys.stderr
        try:
            err.write(s if err.isatty() else ANSI.sub("", s))
        except (OSError, ValueError):   # a terminal that is gone: the launch goes on regardless
            pass
        return len(s)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()


@contextlib.contextmanager
def _launch_output():
    """SkyPilot streams a launch (its resources table, failover warnings, setup logs) to stdout, and its
    logger holds stdout too: both go to stderr, in plain text unless stderr is a terminal."""
    sink = _PlainStderr()
    handlers = [h for h in logging.getLogger("sky").handlers if isinstance(h, logging.StreamHandler)]
    old = [h.stream for h in handlers]
    # Assigned, not setStream(): that flushes the old stream first, and a stream SkyPilot's logger took at
    # import time may be closed by now (a test runner's capture) - which must not fail a launch.
    for h in handlers:
        h.stream = sink
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        for h, stream in zip(handlers, old):
            h.stream = stream


# -----------------------------------------------------------------------------
# Offers

def _remote_api_server() -> bool:
    """With a remote API server (`sky api login`) credentials and enabled clouds live on the server: this
    machine's own SkyPilot state knows nothing, so we ask the server through the SDK. A local server shares
    this machine's state, which we read directly (no request, no server start-up)."""
    try:
        return not server_common.is_api_server_local(server_common.get_server_url())
    except Exception:
        return False


def enabled_clouds() -> list[str]:
    if _remote_api_server():
        try:
            with _quiet():
                return sorted(str(c).lower() for c in sky.get(sky_sdk.enabled_clouds()))
        except Exception:
            return []
    try:
        with _quiet():
            clouds = sky_check.get_cached_enabled_clouds_or_refresh(sky_cloud.CloudCapability.COMPUTE)
    except Exception:  # no credentials at all, or the check itself failed: nothing is enabled
        return []
    return sorted(str(c).lower() for c in clouds)


def _gpu_info(cloud: str) -> dict[str, str]:
    """instance type -> GpuInfo text, straight from the catalog CSV SkyPilot has on disk."""
    path = catalog_common.get_catalog_path(f"{cloud}/vms.csv")
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("InstanceType"):
                    out.setdefault(row["InstanceType"], str(row.get("GpuInfo") or ""))
    return out


def _catalog_query(clouds: list[str], **kwargs) -> tuple[dict[str, dict], list[str]]:
    """list_accelerators per cloud, in parallel, each bounded in time (a catalog download without a
    network would otherwise hang). Returns ({cloud: {acc: [InstanceTypeInfo]}}, notes)."""
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def one(cloud: str) -> None:
        try:
            results[cloud] = sky.catalog.list_accelerators(clouds=cloud, **kwargs)
        except BaseException as e:  # noqa: a cloud we cannot read is skipped, never fatal
            errors[cloud] = type(e).__name__

    timeout_s = float(os.environ.get("NANOCHAT_CATALOG_TIMEOUT", "30"))
    threads = [threading.Thread(target=one, args=(c,), daemon=True) for c in clouds]
    deadline = time.time() + timeout_s
    with _quiet():
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.time()))
    skipped = {c: errors.get(c, f"no answer in {timeout_s:.0f}s") for c in clouds if c not in results}
    notes = []
    if skipped:  # one line, however many clouds: the usual cause (offline) is the same for all of them
        whys = ", ".join(sorted(set(skipped.values())))
        notes.append(f"skipped {len(skipped)} cloud(s) whose price catalog could not be read ({whys}; offline?): "
                     f"{', '.join(skipped)}")
    return dict(results), notes


def rank_offers(gpus: str, clouds: list[str] | None = None, spot: bool = False, allow_pcie: bool = False,
                max_price: float | None = None) -> Offers:
    name, count = parse_gpus(gpus)
    if clouds:
        unknown = [c for c in clouds if c not in GPU_CLOUDS]
        if unknown:
            raise NanochatError(f"unknown cloud(s) {', '.join(unknown)}; choose from {', '.join(GPU_CLOUDS)}")
    if max_price is not None and not max_price > 0:
        raise NanochatError(f"--max-price must be a positive $/h, got {max_price}")
    wanted = clouds or GPU_CLOUDS
    # The name matches exactly, or with an "-SXM" suffix (RunPod spells its NVLink parts "H100-SXM").
    pattern = rf"^{re.escape(name)}(?:-SXM\d?)?$"
    found, notes = _catalog_query(wanted, gpus_only=True, name_filter=pattern, case_sensitive=False,
                                  all_regions=True)
    if not found:
        raise NanochatError("no cloud price catalog could be read (SkyPilot downloads them on first use, which "
                            "needs the internet); connect and run `nanochat up --dryrun` again")
    enabled = enabled_clouds()
    rows, counts = {}, set()
    for cloud, by_acc in found.items():
        info_text = None
        for acc, items in by_acc.items():
            for it in items:
                counts.add(int(it.accelerator_count))
                if int(it.accelerator_count) != count:
                    continue
                price = it.spot_price if spot else it.price
                if price is None or (isinstance(price, float) and math.isnan(price)) or price <= 0:
                    continue
                if info_text is None:
                    info_text = _gpu_info(cloud)
                link = interconnect(cloud, acc, count, it.instance_type, info_text.get(it.instance_type or ""))
                offer = {"cloud": cloud, "region": it.region, "instance_type": it.instance_type or f"{acc}:{count}",
                         "accelerators": f"{acc}:{count}", "spot": spot, "price_per_hour": round(float(price), 4),
                         "interconnect": link, "enabled": cloud in enabled}
                key = (cloud, it.region, offer["instance_type"], offer["accelerators"])
                if key not in rows or rows[key]["price_per_hour"] > offer["price_per_hour"]:
                    rows[key] = offer
    if not counts:
        raise NanochatError(_unknown_gpu_message(name, list(found)))
    offers = sorted(rows.values(), key=lambda o: (o["price_per_hour"], o["cloud"], o["region"]))
    if not offers:
        what = "spot " if spot else ""
        raise NanochatError(f"no {what}offer has {name}:{count}; available counts: "
                            f"{', '.join(map(str, sorted(counts)))}" + (" (try without --spot)" if spot else ""))
    if not allow_pcie and count > 1:
        pcie = [o for o in offers if o["interconnect"] == "pcie"]
        if pcie:
            offers = [o for o in offers if o["interconnect"] != "pcie"]
            notes.append(f"excluded {len(pcie)} PCIe-only offer(s) (no NVLink; e.g. {pcie[0]['cloud']} "
                         f"{pcie[0]['instance_type']} ${pcie[0]['price_per_hour']:.2f}/h); --allow-pcie includes them")
    if max_price is not None:
        above = [o for o in offers if o["price_per_hour"] > max_price]
        offers = [o for o in offers if o["price_per_hour"] <= max_price]
        if above:
            notes.append(f"excluded {len(above)} offer(s) above ${max_price:.2f}/h (--max-price)")
        if not offers:
            raise NanochatError(f"no {name}:{count} offer costs ${max_price:.2f}/h or less; the cheapest is "
                                f"${above[0]['price_per_hour']:.2f}/h on {above[0]['cloud']}")
    return Offers(offers, notes, enabled)


def _unknown_gpu_message(name: str, clouds: list[str]) -> str:
    known: set[str] = set()
    all_accs, _ = _catalog_query(clouds, gpus_only=True)
    for by_acc in all_accs.values():
        known.update(by_acc)
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(known)[:15])}"
    return f"unknown GPU name '{name}' in the catalogs of {', '.join(sorted(clouds))}; {hint}"


def choose(result: Offers, spot: bool = False, max_price: float | None = None) -> dict:
    """The offer SkyPilot's optimizer picks among the enabled, allowed offers (cheapest that it can use)."""
    usable = [o for o in result.offers if o["enabled"]]
    if not usable:
        cheapest = ", ".join(sorted({o["cloud"] for o in result.offers[:5]}))
        shown = ", ".join(result.enabled) or "none"
        raise NanochatError(f"no cloud with credentials offers this: `sky check` shows enabled: {shown}; the "
                            f"cheapest offers are on {cheapest}; {ENABLE_HINT}")
    candidates = usable[:30]
    task = sky.Task(name="nanochat-choose", run="true")
    resources = []
    for o in candidates:
        acc, n = o["accelerators"].split(":")
        it = None if o["instance_type"] == o["accelerators"] else o["instance_type"]
        resources.append(sky.Resources(infra=f"{o['cloud']}/{o['region']}", instance_type=it,
                                       accelerators={acc: int(n)}, use_spot=spot, max_hourly_cost=max_price))
    task.set_resources(set(resources))
    with sky.Dag() as dag:
        dag.add(task)
    try:
        with _quiet():
            if _remote_api_server():  # the server's optimizer, with the server's enabled clouds
                dag = sky.get(sky.optimize(dag))
                task = dag.tasks[0]
            else:
                Optimizer.optimize(dag, quiet=True)
    except Exception as e:
        raise NanochatError(f"SkyPilot could not place any offer ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); `sky check` shows which clouds are usable") from None
    best = task.best_resources
    for o in candidates:
        it = None if o["instance_type"] == o["accelerators"] else o["instance_type"]
        if str(best.cloud).lower() == o["cloud"] and best.region == o["region"] and \
                (it is None or best.instance_type == it):
            return o
    # The optimizer may choose an equivalent instance type for an attachable GPU: describe what it chose.
    return {**candidates[0], "cloud": str(best.cloud).lower(), "region": best.region,
            "instance_type": best.instance_type, "price_per_hour": round(best.get_cost(3600), 4)}


# -----------------------------------------------------------------------------
# Running things

def _resources(offer: dict, spot: bool, zone: str | None = None) -> "sky.Resources":
    acc, n = offer["accelerators"].split(":")
    it = None if offer["instance_type"] == offer["accelerators"] else offer["instance_type"]
    kwargs = {}
    if spot:
        # Managed-job recovery: on preemption SkyPilot relaunches elsewhere and the pipeline resumes
        # from the latest checkpoint (in the bucket), skipping finished stages.
        kwargs["job_recovery"] = {"strategy": "FAILOVER", "max_restarts_on_errors": SPOT_RESTARTS_ON_ERRORS}
    infra = f"{offer['cloud']}/{offer['region']}" + (f"/{zone}" if zone else "")
    return sky.Resources(infra=infra, instance_type=it, accelerators={acc: int(n)}, use_spot=spot, disk_size=512,
                         **kwargs)


def budget_unsafe(offer: dict, spot: bool, keep: bool) -> str | None:
    """Why a budgeted run must not go to this offer, from SkyPilot's own per-cloud feature table, or None:
    the node must be able to take itself down when its job ends (AUTODOWN), or with --keep to stop itself
    (STOP + AUTOSTOP) - otherwise nothing ends the billing once the job is over."""
    f = sky_clouds.CloudImplementationFeatures
    needed = {f.STOP, f.AUTOSTOP} if keep else {f.AUTODOWN}
    try:
        with _quiet():
            res = _resources(offer, spot)
            res.cloud.check_features_are_supported(res, needed)
    except exceptions.NotSupportedError as e:
        return ANSI.sub("", str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    except Exception:
        return None   # not decidable here (a catalog quirk): the launch itself will say
    return None


# Where a catalog lists no VM that meets the jobs controller's resources: a 4-vCPU, 16 GiB general-purpose VM
# lists at about $0.19/h on demand on AWS (m6i.xlarge) and GCP (n2-standard-4); counted at more than twice that.
CONTROLLER_FALLBACK_PER_HOUR = 0.50


def controller_price(clouds: list[str]) -> float:
    """$/h of the VM SkyPilot keeps up as a spot run's jobs controller (planner.SPOT_RECOVERIES says why it is
    counted). SkyPilot offers the controller one resource per cloud of the job, each the cheapest VM that
    meets its resources (jobs/constants.py's CONTROLLER_RESOURCES, read from SkyPilot itself), and its
    optimizer takes the cheapest: so the cheapest of those clouds, at its dearest region (where in it the
    controller lands is the optimizer's choice, and the cap must hold wherever that is)."""
    per_cloud = []
    for cloud in clouds:
        try:
            with _quiet():
                it = sky.catalog.get_default_instance_type(cpus=str(CONTROLLER_RESOURCES["cpus"]),
                                                           memory=str(CONTROLLER_RESOURCES["memory"]), clouds=cloud)
                regions = sky.catalog.get_region_zones_for_instance_type(it, False, clouds=cloud) if it else []
                prices = [float(sky.catalog.get_hourly_cost(it, False, r.name, None, clouds=cloud)) for r in regions]
            per_cloud.append(max(prices, default=CONTROLLER_FALLBACK_PER_HOUR))
        except Exception:   # a catalog without such a VM (or none at all): the fallback stands
            per_cloud.append(CONTROLLER_FALLBACK_PER_HOUR)
    return round(min(per_cloud, default=CONTROLLER_FALLBACK_PER_HOUR), 4)


def zone_prices(offer: dict, spot: bool) -> dict[str, float]:
    """{zone: $/h per node} of the zones SkyPilot's provisioner tries for this offer's region, from its own
    catalog; {} for a cloud without zones (the region's price is then the only one). A region is listed at
    its cheapest zone's price, but a launch pinned to the region alone tries every zone of it, cheapest
    first - on AWS spot, zones of one region differ by 3x - so what a launch may pay is a zone's price."""
    it = None if offer["instance_type"] == offer["accelerators"] else offer["instance_type"]
    if it is None:
        return {}
    try:
        with _quiet():
            regions = sky.catalog.get_region_zones_for_instance_type(it, spot, clouds=offer["cloud"])
            zones = [z.name for r in regions if r.name == offer["region"] for z in (r.zones or [])]
            return {z: float(sky.catalog.get_hourly_cost(it, spot, offer["region"], z, clouds=offer["cloud"]))
                    for z in zones}
    except Exception:   # a catalog without zone rows: the region's price stands
        return {}


def bounded_resources(rec: dict) -> tuple[set, dict[str, float]]:
    """The resources a launch may land on, each within the price the plan assumed: every candidate offer, and
    for a cloud with zones only the zones of its region whose price (per node) is at most the plan's max price
    per node (rec["max_price_per_hour"] is for the whole job, a spot run's jobs controller included). Returns
    (resources, {"cloud/region/zone": $/h per node}) so the price a managed job actually pays can be read back
    from where SkyPilot placed it."""
    spot = bool(rec.get("spot"))
    nodes = int(rec.get("nodes") or 1)
    whole = float(rec.get("max_price_per_hour") or 0.0) - float(rec.get("controller_per_hour") or 0.0)
    cap = max(0.0, whole) / nodes
    out, prices = set(), {}
    for o in rec.get("candidates") or [rec["offer"]]:
        zones = zone_prices(o, spot)
        fitting = {z: p for z, p in zones.items() if not cap or p <= cap + 1e-9}
        if not zones:
            out.add(_resources(o, spot))
        for z, p in fitting.items():
            out.add(_resources(o, spot, z))
            prices[f"{o['cloud']}/{o['region']}/{z}"] = round(p, 4)
    if not out:
        raise NanochatError(f"no zone of the planned offers costs ${cap:.2f}/h per node or less in SkyPilot's "
                            "catalog: run `nanochat train --dryrun` again to plan on today's prices")
    return out, prices


def build_task(rec: dict, run_name: str, args: list[str], spec_file: Path | None,
               mounts: dict[str, str] | None = None) -> "sky.Task":
    """train.yaml with the record's resources, the pipeline's arguments and the run spec shipped as a file:
    the node reads its budget and deadlines from that file alone (nanochat_core/run_spec.py)."""
    task = sky.Task.from_yaml(str(yaml_path("train")))
    task.workdir = str(workdir())
    if mounts:   # your own data (task_files.data_mounts): synced to the node before the job starts
        task.update_file_mounts(mounts)
    task.num_nodes = int(rec.get("nodes") or 1)
    # Every candidate offer, so SkyPilot fails over to the next cheapest on a capacity error - but only in
    # zones whose price the plan allowed for (its max price set the deadlines that keep the cap).
    resources, _ = bounded_resources(rec)
    task.set_resources(resources)
    bucket_dir = ""
    if rec.get("bucket"):
        # MOUNT_CACHED: checkpoints are written to local disk and uploaded in the background, so saving
        # stays fast and they outlive the node (a plain file_mount would only copy the bucket down once).
        storage = sky.Storage(source=rec["bucket"], mode=sky.StorageMode.MOUNT_CACHED)
        task.set_storage_mounts({BUCKET_MOUNT: storage})
        bucket_dir = bucket_runs(BUCKET_MOUNT)
    remote_spec = ""
    if spec_file is not None:
        remote_spec = f"{REMOTE_SPECS}/{run_name}/{spec_file.name}"
        task.update_file_mounts({remote_spec: str(spec_file)})
    deadline_at = run_spec.read(spec_file).deadline_at if spec_file is not None else None
    task.update_envs({"NANOCHAT_RUN": run_name, "NANOCHAT_ARGS": shlex.join(args), "NANOCHAT_SPEC": remote_spec,
                      "NANOCHAT_BUCKET_DIR": bucket_dir,
                      "NANOCHAT_SETUP_GUARD": setup_guard(deadline_at, bool(rec.get("keep")), time.time())})
    # Secrets travel as SkyPilot secrets (redacted in its records), taken from this shell's environment.
    secrets = {k: os.environ[k] for k in ("HF_TOKEN", "WANDB_API_KEY") if os.environ.get(k)}
    if secrets:
        task.update_secrets(secrets)
    return task


def setup_guard(deadline_at: float | None, keep: bool, now: float) -> str:
    """The command sky/train.yaml's setup runs first on the head node: the autostop SkyPilot itself would set
    after setup (its own codegen, AutostopCodeGen - what its backend runs on the head node over SSH), set at
    once, so the node ends its own billing if nothing submits a job within SETUP_GUARD_MIN minutes (or before
    the budget's deadline, if sooner): a laptop asleep during setup, a setup that hangs. SkyPilot's skylet,
    already running then, counts idle minutes (no job) and tears the node down (with --keep: stops it); once
    setup succeeds SkyPilot sets the run's own autostop (AUTOSTOP_MIN) over it."""
    left = SETUP_GUARD_MIN if deadline_at is None else (deadline_at - now) / 60
    minutes = max(1, min(SETUP_GUARD_MIN, int(left)))
    return AutostopCodeGen.set_autostop(minutes, sky_backends.CloudVmRayBackend.NAME, AutostopWaitFor.JOBS,
                                        down=not keep)


def _autostop(rec: dict) -> dict:
    """Autostop (with teardown unless --keep) that waits for jobs only: an open ssh session must not keep a
    budgeted node billing. Idle minutes: the record's (planner.AUTOSTOP_MIN for a budgeted run)."""
    return {"idle_minutes_to_autostop": rec.get("autostop_minutes") or AUTOSTOP_MIN, "wait_for": AutostopWaitFor.JOBS,
            "down": not rec.get("keep")}


def _launched_price(handle, nodes: int) -> float | None:
    """$/h of what SkyPilot actually launched (after any failover), for the whole cluster."""
    try:
        return round(job_price(handle.launched_resources.get_cost(3600), nodes), 4)
    except Exception:
        return None


def _server_answers() -> bool:
    """Can SkyPilot be asked without starting anything? A remote server: yes (it is asked); a local one only
    when it is running (SkyPilot keeps the one our launches used running in the background)."""
    try:
        return not server_common.is_api_server_local(server_common.get_server_url()) or \
            server_common.get_api_server_status().status == server_common.ApiServerStatus.HEALTHY
    except Exception:
        return False


class SkyBackend:
    name = "sky"

    def _run_launch(self, rec: dict, request_fn, action: str, created: bool):
        """Send one provisioning request and wait for it. If it fails or is interrupted (Ctrl-C, a closed
        laptop's SIGHUP surfaces the same way) after the node may exist, the cluster this command created is
        torn down at once; if even that fails, its record stays and the error names the exact command."""
        request_id = None

        def hangup(_signum, _frame):  # a closed terminal or laptop: handled exactly like Ctrl-C
            raise KeyboardInterrupt

        old_hup = None
        if threading.current_thread() is threading.main_thread():
            old_hup = signal.signal(signal.SIGHUP, hangup)
        try:
            with _launch_output():
                request_id = request_fn()
                return sky.stream_and_get(request_id)
        except BaseException as e:  # noqa: KeyboardInterrupt included - that is the point
            if old_hup is not None:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the terminal is gone: finish the teardown
            if not created:
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise NanochatError(f"{sky_error(action, e)}; cluster '{rec['name']}' was up before this launch "
                                    "and stays up until its autostop: `nanochat down --cluster "
                                    f"{rec['name']}` stops it now") from None
            interrupted = isinstance(e, KeyboardInterrupt)
            with contextlib.suppress(OSError):  # stderr may be a terminal that no longer exists
                print(f"{'interrupted' if interrupted else action + ' failed'}: tearing down cluster "
                      f"'{rec['name']}' so that nothing keeps billing...", file=sys.stderr, flush=True)
            if request_id is not None:
                with contextlib.suppress(Exception):
                    sky.get(sky.api_cancel(request_id))
            try:
                with _quiet():
                    sky.get(sky.down(rec["name"]))
            except Exception as down_error:
                if not already_gone(down_error):
                    raise NanochatError(
                        f"{action} failed ({type(e).__name__}: {str(e).strip()[:200]}) and tearing the cluster down "
                        f"failed too ({type(down_error).__name__}); it may be billing: run `nanochat down --cluster "
                        f"{rec['name']}` (or `sky down {rec['name']}`) now") from None
            state.remove_cluster(rec["name"])
            if interrupted:
                raise NanochatError(f"interrupted: cluster '{rec['name']}' was torn down; nothing is billing") from None
            raise NanochatError(f"{sky_error(action, e)}; cluster '{rec['name']}' was torn down, nothing is "
                                "billing") from None
        finally:
            if old_hup is not None:
                signal.signal(signal.SIGHUP, old_hup)

    def provision(self, rec: dict, created: bool = True) -> None:
        """Bring the cluster up with the environment installed (setup only; `train` runs the job)."""
        task = build_task(rec, "warmup", [], None)
        task.run = None
        _job_id, handle = self._run_launch(
            rec, lambda: sky.launch(task, cluster_name=rec["name"], **_autostop(rec)),
            f"provisioning {rec['name']}", created) or (None, None)
        self._record_price(rec, handle)

    def _record_price(self, rec: dict, handle) -> None:
        price = _launched_price(handle, int(rec.get("nodes") or 1)) if handle is not None else None
        if price is not None and price > 0:
            lr = handle.launched_resources
            rec.update(price_per_hour=price, launched={"cloud": str(lr.cloud).lower(), "region": lr.region,
                                                       "zone": lr.zone, "instance_type": lr.instance_type})
            state.update_cluster(rec["name"], price_per_hour=price, launched=rec["launched"])

    def launch(self, rec: dict, rd: Path, args: list[str], spec_file: Path | None = None,
               dryrun: bool = False) -> dict:
        """Run the pipeline for run dir `rd` on the cluster (provisioning it if needed) or, with
        rec["spot"], as a managed job, with the run spec at `spec_file` shipped to the node. dryrun: SkyPilot
        plans the launch and stops (nothing recorded)."""
        spec = run_spec.read(spec_file) if spec_file is not None else None
        task = build_task(rec, rd.name, args, spec_file, data_mounts(spec.to_json() if spec else None))
        # cursor 0: SkyPilot replays a job's own log from its start (tail counts lines)
        job = {"backend": "sky", "cluster": rec["name"], "run": rd.name, "managed": bool(rec.get("spot")),
               "state": "RUNNING", "submitted_at": time.time(), "cursor": 0}
        created = bool(rec.get("created_by_this_launch")) and not dryrun
        action = f"launching run '{rd.name}'"
        if job["managed"] and not dryrun:
            # Where SkyPilot places a managed job is read back later (cloud, region, zone): keep what each
            # allowed zone costs, so the meter and `status` show the price actually paid.
            state.update_cluster(rec["name"], zone_prices=bounded_resources(rec)[1])
        if job["managed"]:
            job_ids, _ = self._run_launch(rec, lambda: sky.jobs.launch(task, name=f"nanochat-{rd.name}"), action,
                                          False) or (None, None)
            job["job_id"] = (job_ids or [None])[0]
        else:
            job_id, handle = self._run_launch(
                rec, lambda: sky.launch(task, cluster_name=rec["name"], dryrun=dryrun, **_autostop(rec)),
                action, created) or (None, None)
            job["job_id"] = job_id
            if not dryrun:
                self._record_price(rec, handle)
        if not dryrun:
            state.write_job(rd, job)
        return job

    def job_state(self, rec: dict, rd: Path) -> str | None:
        job = state.read_job(rd) or {}
        if job.get("job_id") is None:
            return job.get("state")
        try:
            if job.get("managed"):
                records = self._managed_jobs(job_ids=[job["job_id"]])
                status = records[0]["status"] if records else None
                if records and records[0].get("end_at") and not job.get("ended_at"):   # recorded once
                    job["ended_at"] = float(records[0]["end_at"])
                    state.write_job(rd, job)
                if records:
                    record_managed_price(rec, records[0])
            else:
                status = sky.get(sky.job_status(rec["name"], [job["job_id"]])).get(job["job_id"])
        except Exception:
            return "UNKNOWN"
        return job_state_name(status) or "UNKNOWN"

    def tail(self, rec: dict, rd: Path, cursor: int | None, follow: bool = True) -> Iterator[tuple[str, int]]:
        """Log lines from line number `cursor` on (SkyPilot replays a job's log from its start on every
        connection, so the lines already delivered are skipped: nothing is shown twice)."""
        pos = start_of(cursor)
        job = state.read_job(rd) or {}
        n = 0
        try:
            for line in self._raw_lines(rec, job, follow):
                n += 1
                if n > pos:
                    yield line.rstrip("\n"), n
        except (ConnectionError, TimeoutError, OSError):
            raise  # a dropped transport: stream.resilient reconnects
        except Exception as e:  # cluster gone, job unknown, server refused: say so in one line
            raise sky_error(f"reading the log of run '{rd.name}' on {rec['name']}", e) from None

    def _raw_lines(self, rec: dict, job: dict, follow: bool) -> Iterator[str]:
        if not job.get("managed"):
            buf = ""  # chunks need not end at line boundaries: only complete lines go out
            for chunk in sky.tail_logs(rec["name"], job.get("job_id"), follow=follow, preload_content=False):
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split("\n")
                    yield from lines
            if buf:
                yield buf
            return
        # Managed jobs only write to a stream: pump it through a queue from a helper thread.
        q: queue.Queue = queue.Queue()

        class _Sink(io.TextIOBase):
            def write(self, s):
                q.put(s)
                return len(s)

        def pump():
            try:
                sky.jobs.tail_logs(job_id=job.get("job_id"), follow=follow, output_stream=_Sink())
            except Exception as e:
                q.put(e)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        buf = ""
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, Exception):
                raise ConnectionError(str(item))
            buf += item
            *lines, buf = buf.split("\n")
            yield from lines
        if buf:
            yield buf

    @staticmethod
    def _managed_jobs(**kwargs) -> list:
        """Managed-job records (queue_v2: the v1 call is deprecated and says so on every use). refresh=False:
        asking must never restart a stopped jobs controller (that would bill)."""
        with _quiet():
            got = sky.get(sky.jobs.queue_v2(refresh=False, **kwargs))
        return list(got[0] if isinstance(got, tuple) else got or [])

    def discover(self) -> list[dict]:
        """nanochat's clusters and unfinished managed jobs as SkyPilot itself records them (their names start
        with "nanochat"), so one whose local record is missing - another laptop, a lost clusters.json, a
        launch killed before it could write anything - is still seen and can be torn down. Best effort:
        [] when SkyPilot cannot be asked. A local API server that is not running is not started just to
        look (SkyPilot keeps the one our launches used running in the background)."""
        found = []
        if not _server_answers():
            return []
        with contextlib.suppress(Exception):
            with _quiet():
                records = sky.get(sky.status()) or []
            for r in records:
                if str(r["name"]).startswith("nanochat"):
                    status = r["status"]
                    found.append({"name": r["name"], "kind": "cluster",
                                  "state": str(getattr(status, "value", status))})
        with contextlib.suppress(Exception):
            for j in self._managed_jobs(skip_finished=True, name_match="nanochat"):
                if str(j.get("job_name") or "").startswith("nanochat"):
                    found.append({"name": j["job_name"], "kind": "managed", "job_id": j.get("job_id"),
                                  "state": job_state_name(j.get("status")) or "UNKNOWN"})
        return found

    def down_discovered(self, item: dict) -> None:
        try:
            with _quiet():
                if item["kind"] == "managed":
                    sky.get(sky.jobs.cancel(job_ids=[item["job_id"]]))
                else:
                    sky.get(sky.down(item["name"]))
        except Exception as e:
            if not already_gone(e):
                raise sky_error(f"tearing down {item['name']}", e) from None

    def cluster_state(self, rec: dict, start_server: bool = True) -> str:
        """UP, STOPPED, INIT or DOWN as SkyPilot records it; MANAGED for a spot run's managed job. With
        start_server=False a local API server that is not running is not started just to look: UNKNOWN."""
        if rec.get("spot"):
            return "MANAGED"
        if not start_server and not _server_answers():
            return "UNKNOWN"
        try:
            records = sky.get(sky.status([rec["name"]]))
        except Exception as e:
            raise sky_error("sky status", e) from None
        if not records:
            return "DOWN"
        status = records[0]["status"] if isinstance(records[0], dict) else getattr(records[0], "status", None)
        return str(getattr(status, "value", status))

    def pull(self, rec: dict, rd: Path, dest: Path) -> int:
        if rec.get("bucket"):
            src = f"{bucket_runs(rec['bucket'])}/{rd.name}"
            pull_mod.bucket_sync(src, dest)
        else:
            # Only the `sky` CLI writes the ssh alias for a cluster; `sky status <name>` refreshes it.
            # The `sky` next to this Python: works without an activated venv (PATH need not have it).
            sky_cli = Path(sys.executable).parent / "sky"
            with contextlib.suppress(OSError):
                subprocess.run([str(sky_cli) if sky_cli.exists() else "sky", "status", rec["name"]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            pull_mod.rsync(f"{rec['name']}:{NODE_RUNS}/{rd.name}", dest, ssh=True)
        return pull_mod.verify(dest)

    def down(self, rec: dict) -> list[str]:
        runs = [r for r in rec.get("runs", [])]
        try:
            if rec.get("spot"):  # managed jobs: cancelling one releases the node SkyPilot made for it
                for r in runs:
                    job = state.read_job(state.run_dir(r)) or {}
                    try:
                        if job.get("job_id") is not None:
                            sky.get(sky.jobs.cancel(job_ids=[job["job_id"]]))
                        else:  # the launch never reported an id: cancel by the name we gave it
                            sky.get(sky.jobs.cancel(name=f"nanochat-{r}"))
                    except Exception as e:
                        # The jobs controller stops itself once no managed job is left: if it is not up,
                        # none of ours is running, and the record must still be clearable.
                        if not already_gone(e):
                            raise
            # Always also tear down a cluster of this name, should one exist: never leave a node billing.
            sky.get(sky.down(rec["name"]))
        except Exception as e:
            if already_gone(e):
                return runs if rec.get("spot") else []  # already gone: down is idempotent
            raise sky_error(f"tearing down {rec['name']}", e) from None
        return runs

    def final_cost(self, rec: dict) -> float | None:
        try:
            report = sky.get(sky.cost_report())
        except Exception:
            return None
        for r in report or []:
            if r.get("name") == rec["name"] and r.get("total_cost") is not None:
                return float(r["total_cost"])
        return None
