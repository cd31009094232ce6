"""
Node 0 decides, the other nodes follow: what the pipelines of a multi-node run say to each other.

Every node runs the pipeline, and each training or eval stage is ONE torchrun job across all nodes, so all
nodes must run the same stages in the same order. What to skip (stages.json), whether base fell too far
short of its plan (its last checkpoint), whether the deadline still leaves room for a stage (the clock):
node 0 decides that from the books it keeps. The other nodes must not decide it from their own reading of
the run dir: on a bucket mount they see node 0's files late, or an older version of them (shared_dir.py).
A stale stages.json would make a node run a stage that node 0 skips; a stale base checkpoint, stop where
node 0 goes on - and the torchrun jobs of the two no longer pair up.

So node 0 says it over the network: a small key-value store (torch.distributed's TCPStore) that node 0's
pipeline hosts at SKYPILOT_NODE_IPS[0]:$NANOCHAT_LEAD_PORT (default 29510; a multi-node cluster's nodes
reach each other on every port - NCCL needs that too). It lives exactly as long as node 0's pipeline, so
nothing in it is ever stale. Keys: "plan" (the stages node 0 will run), "stage/<name>" (node 0 starts that
stage now, and which tokenizer it has), "end" (node 0 ended the run early: its exit code and why), "bye"
(how many other nodes have heard the last word; node 0 waits for them before it exits).
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

from nanochat_core.common import NanochatError, sha256_file

PORT = 29510
END = "end"


class LeadLink:
    def __init__(self, lead: bool, nnodes: int, connect_s: float = 600.0):
        self.lead, self.nnodes, self.store, self.ended = lead, nnodes, None, False
        if nnodes <= 1:
            return
        from torch.distributed import TCPStore   # lazy: the CLI imports this module, and must not load torch
        ips = os.environ.get("SKYPILOT_NODE_IPS", "").split()
        port = int(os.environ.get("NANOCHAT_LEAD_PORT") or PORT)
        if not ips:
            raise NanochatError("a multi-node pipeline needs SKYPILOT_NODE_IPS (set by SkyPilot) to find node 0")
        try:
            self.store = TCPStore(ips[0], port, is_master=lead, wait_for_workers=False,
                                  timeout=timedelta(seconds=connect_s))
        except RuntimeError as e:   # torch's DistNetworkError / DistStoreError
            raise NanochatError(f"cannot {'listen on' if lead else 'reach node 0 at'} {ips[0]}:{port} for the "
                                f"pipelines' coordination ({str(e).splitlines()[0][:120]})") from None

    def tell(self, key: str, value: dict) -> None:
        """Node 0: say it (a no-op on one node, and on the other nodes)."""
        if self.store is not None and self.lead:
            self.store.set(key, json.dumps(value))

    def end(self, code: int, why: str) -> None:
        """Node 0 ends the run early; the other nodes end with the same code."""
        if not self.ended:
            self.tell(END, {"code": code, "why": why})
            self.ended = True

    def ask(self, key: str, stopping: Callable[[], bool], timeout_s: float = 3600.0) -> dict:
        """The other nodes: node 0's word on `key`. If node 0 has ended the run instead (budget, signal,
        error), we end too, with its exit code. Polls, so that a signal still stops us."""
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.store.check([END]):
                    end = json.loads(self.store.get(END))
                    print(f"node 0 ended the run ({end['why']}); so does this node", flush=True)
                    sys.exit(end["code"])
                if self.store.check([key]):
                    return json.loads(self.store.get(key))
                if stopping():
                    sys.exit(143)
                if time.monotonic() > deadline:
                    raise NanochatError(f"node 0 said nothing about '{key}' for {timeout_s / 60:.0f} min; "
                                        "check node 0's log")
                time.sleep(0.5)
        except RuntimeError as e:   # node 0's pipeline is gone (its store with it)
            raise NanochatError(f"lost node 0's pipeline while waiting for '{key}' ({str(e).splitlines()[0][:80]}); "
                                "check node 0's log") from None

    def close(self, wait_s: float = 120.0) -> None:
        """At exit. The other nodes: say we heard the last word. Node 0: keep the store up until they have
        (bounded: a node that died never will)."""
        if self.store is None:
            return
        try:
            if not self.lead:
                self.store.add("bye", 1)
                return
            deadline = time.monotonic() + wait_s
            while self.store.add("bye", 0) < self.nnodes - 1 and time.monotonic() < deadline:
                time.sleep(0.5)
        except RuntimeError:
            pass   # the other side is gone already: nothing left to say


def wait_for_file(path: Path, sha256: str, what: str, stopping: Callable[[], bool], timeout_s: float = 3600.0) -> None:
    """The other nodes: wait until node 0's file is visible here with node 0's content. A bucket mount shows
    it only after its upload and our listing's expiry, and until then maybe an older version."""
    end = time.monotonic() + timeout_s
    while not (path.is_file() and sha256_file(path) == sha256):
        if stopping():
            sys.exit(143)
        if time.monotonic() > end:
            raise NanochatError(f"{what} from node 0 did not appear in {path.parent} within {timeout_s / 60:.0f} "
                                "min; check node 0's log")
        time.sleep(2.0)
