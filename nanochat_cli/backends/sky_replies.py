"""
SkyPilot's answers turned into ours, in plain Python (backends/skypilot.py is the only module that imports sky):
job states in the names the CLI uses, SkyPilot errors as one plain line, and what a managed job costs once
SkyPilot has placed it.
"""
from __future__ import annotations

import re

from nanochat_core.common import NanochatError
from nanochat_core.run_spec import job_price
from nanochat_cli import state

_JOB_STATES = {"PENDING": "RUNNING", "SUBMITTED": "RUNNING", "SETTING_UP": "RUNNING", "RUNNING": "RUNNING", "STARTING": "RUNNING",
               "RECOVERING": "RUNNING", "INIT": "RUNNING", "SUCCEEDED": "SUCCEEDED", "CANCELLED": "CANCELLED",
               "CANCELLING": "CANCELLED"}


def job_state_name(status) -> str | None:
    if status is None:
        return None
    name = getattr(status, "value", None) or getattr(status, "name", None) or str(status)
    name = str(name).split(".")[-1].upper()
    return _JOB_STATES.get(name, "FAILED" if "FAIL" in name else name)


# SkyPilot 0.14 saying nothing of ours is left to stop: sky.down raises ClusterDoesNotExist for a cluster it
# does not know, sky.jobs.cancel ClusterNotUpError when the jobs controller is down (it stops once no managed
# job is left). Both keep their class through the API server; the message decides nothing ("does not exist"
# ends other errors too, and a record dropped by mistake is a node billing unseen).
GONE = ("ClusterDoesNotExist", "ClusterNotUpError")


def already_gone(e: BaseException) -> bool:
    return any(cls.__name__ in GONE for cls in type(e).__mro__)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def sky_error(action: str, e: Exception) -> NanochatError:
    # SkyPilot colours its messages for its own terminal UI: our one-line errors carry plain text.
    first = (ANSI.sub("", str(e)).strip().splitlines() or [type(e).__name__])[0][:300]
    return NanochatError(f"{action} failed ({type(e).__name__}: {first}); `sky status` and `sky check` help "
                         "diagnose it")


def record_managed_price(rec: dict, record) -> None:
    """A managed job reports where SkyPilot placed it (cloud, region, zone), not its price: the price is that
    zone's (recorded at launch from SkyPilot's catalog), else that failover candidate's, so the meter and
    `status` show what the run really costs."""
    cloud, region = str(record.get("cloud") or "").lower(), record.get("region")
    zone = record.get("zone") if record.get("zone") not in (None, "-") else None
    current = state.get_cluster(rec["name"]) or rec
    match = [c for c in current.get("candidates") or [] if c["cloud"] == cloud and c["region"] == region]
    launched = current.get("launched") or {}
    if not cloud or not match or (launched.get("region"), launched.get("zone")) == (region, zone):
        return
    nodes = int(current.get("nodes") or 1)
    per_node = (current.get("zone_prices") or {}).get(f"{cloud}/{region}/{zone}")
    if per_node is None:
        per_node = max(float(c["price_per_hour"]) for c in match)
    state.update_cluster(rec["name"], price_per_hour=round(job_price(per_node, nodes, current.get("controller_per_hour") or 0.0), 4), launched={
        "cloud": cloud, "region": region, "zone": zone, "instance_type": match[0]["instance_type"]})
