"""Several nodes, one bucket-mounted run dir: the shared-dir check and the checkpoint protocol under the
visibility rules of a real MOUNT_CACHED mount (late uploads, expiring listings, no empty directories), on the
simulated store of tests/objectstore.py. Each "node" is one process with real torch.distributed (gloo) and
its own view of the bucket as its run dir; torchrun's env says one process per node (LOCAL_WORLD_SIZE=1)."""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from objectstore import ObjectStore

PY = sys.executable
HERE = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# The node processes: `python tests/test_shared_store.py '<json>'`

def _tiny_net():
    import torch
    import torch.nn as nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class _FakeClock:
    """shared_dir's `time` in a node process (a["fake_clock"]): sleep() moves this clock on by what was asked,
    after a real pause of a few ms, so a wait lasts as many of its own seconds as it means to, however busy the
    machine. For a wait that nothing can end early (nodes that share nothing), whose length is the point."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        time.sleep(0.005)
        self.now += seconds


def _job_check(a: dict, result: dict) -> None:
    from nanochat_core.node import shared_dir
    clock = time.monotonic
    if a.get("fake_clock"):
        shared_dir.time = _FakeClock()
        clock = shared_dir.time.monotonic
    t0 = clock()
    try:
        shared_dir.check_shared_dir(Path(a["run_dir"]) / "base")
        result["shared"] = True
    finally:
        result["seconds"] = clock() - t0


def _job_save(a: dict, result: dict) -> None:
    """Save each of a["steps"]; a["die"] = {"rank": r, "step": s, "at": "meta"|"shard"} kills that rank (as kill -9
    would) right before rank 0 commits meta.json, or half-way through writing its optimizer shard."""
    import torch
    from nanochat_core.gpt import checkpoint
    rank, world, die = a["rank"], a["world"], a.get("die") or {}
    model = _tiny_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    for step in a["steps"]:
        if die.get("rank") == rank and die.get("step") == step:
            if die["at"] == "meta":
                real_write = checkpoint.atomic_write_bytes
                checkpoint.atomic_write_bytes = lambda p, data: (os._exit(9) if p.name == "meta.json"
                                                                 else real_write(p, data))
            else:
                real_save = torch.save

                def half_then_die(obj, f):
                    real_save(obj, f)
                    f.f.truncate(f.f.tell() // 2)
                    f.f.flush()
                    os._exit(9)
                torch.save = half_then_die
        path = checkpoint.save_checkpoint(Path(a["run_dir"]) / "base", step, model, opt, {"stage": "test"},
                                          rank, world, loader_state={"rank": rank, "step": step})
        result.setdefault("saved", []).append(path.name)


def _node_main(a: dict) -> None:
    os.environ.update(RANK=str(a["rank"]), WORLD_SIZE=str(a["world"]), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      NANOCHAT_SHARED_WAIT_S=str(a["wait_s"]), OMP_NUM_THREADS="1")
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{a['init']}", rank=a["rank"], world_size=a["world"],
                            timeout=datetime.timedelta(seconds=60))
    result: dict = {}
    try:
        {"check": _job_check, "save": _job_save}[a["job"]](a, result)
        result["ok"] = True
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    Path(a["out"], f"{a['rank']}.json").write_text(json.dumps(result))
    os._exit(0)   # no teardown handshake with a peer that may be gone


def _run_nodes(tmp_path: Path, job: str, run_dirs: list[Path], wait_s: float = 30, deadline_s: float = 120,
               **kw) -> list[dict]:
    """One process per node, each with its own run dir; their results (or how they died)."""
    out = tmp_path / f"out-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    init = tmp_path / f"pg-{uuid.uuid4().hex[:8]}"
    procs = []
    for rank, run_dir in enumerate(run_dirs):
        a = dict(job=job, rank=rank, world=len(run_dirs), run_dir=str(run_dir), init=str(init), out=str(out),
                 wait_s=wait_s, **kw)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
        procs.append(subprocess.Popen([PY, __file__, json.dumps(a)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    end = time.monotonic() + deadline_s
    results = []
    for rank, p in enumerate(procs):
        try:
            log, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()       # our own child, by its pid
            log, _ = p.communicate()
        f = out / f"{rank}.json"
        results.append(json.loads(f.read_text()) if f.exists() else {"died": p.returncode, "log": log[-3000:]})
    return results


# -----------------------------------------------------------------------------
# The simulated store itself behaves like the real thing where it matters

def test_the_simulated_store_has_late_visibility_no_empty_dirs_and_lossy_dir_renames(tmp_path):
    with ObjectStore(tmp_path, write_back_s=0.3, dir_cache_s=0.8) as store:
        a, b = store.view(0), store.view(1)
        (a / "d").mkdir()
        (a / "d" / "f").write_text("v1")
        (a / "empty").mkdir()
        assert (a / "d" / "f").read_text() == "v1" and not (b / "d").exists()   # only its own node sees it
        store.settle()
        assert (b / "d" / "f").read_text() == "v1" and not (b / "empty").exists()
        (a / "d" / "f").write_text("v2!")
        time.sleep(0.1)
        assert (b / "d" / "f").read_text() == "v1"                                # the old version, for a while
        store.settle()
        assert (b / "d" / "f").read_text() == "v2!"
        (b / "d" / "g").write_text("from b")          # a writes the dir's rename before it sees b's file
        os.rename(a / "d", a / "e")
        store.settle()
        assert store.keys() == ["d/g", "e/f"]          # b's file stayed behind under the old name
        assert (b / "d" / "g").exists() and not (b / "d" / "f").exists() and (b / "e" / "f").exists()


# -----------------------------------------------------------------------------
# check_shared_dir

def test_check_shared_dir_waits_for_late_visibility_and_still_fails_on_unshared_dirs(tmp_path):
    with ObjectStore(tmp_path / "s", write_back_s=0.5, dir_cache_s=1.5) as store:
        res = _run_nodes(tmp_path, "check", [store.view(0) / "run", store.view(1) / "run"], wait_s=30)
    assert all(r.get("shared") for r in res), res
    # visibility was late, and waited for: the store shows a node's file to the other only 0.5 s after it was
    # written, so neither check can have ended sooner (a lower bound: a busy machine only makes it later)
    assert max(r["seconds"] for r in res) > 0.5

    # Nodes that share nothing: each waits out its bound (3 s), then fails clearly. On the nodes' injected clock,
    # so "its bound" is exact and no busy machine stretches it: 3 polls of 1 s, not a second more or less.
    apart = [tmp_path / "n0" / "run", tmp_path / "n1" / "run"]
    res = _run_nodes(tmp_path, "check", apart, wait_s=3, fake_clock=True)
    for r in res:
        assert "is not shared by all nodes (after 3 s" in r.get("error", ""), res
        assert r["seconds"] == 3.0, res


# -----------------------------------------------------------------------------
# Saving on two nodes

def _assert_latest_everywhere(store, step):
    import torch
    from nanochat_core.gpt.checkpoint import find_latest, load_checkpoint, read_meta, verify_checkpoint
    for node in (0, 1):
        latest = find_latest(store.view(node) / "run" / "base")
        assert latest is not None and latest.name == f"ckpt_{step:06d}", (node, latest)
        assert verify_checkpoint(latest) is None                       # every shard there, every hash right
        meta = read_meta(latest)
        assert meta["world_size"] == 2 and set(meta["files"]) == {"model.safetensors", "optim_rank000.pt",
                                                                    "optim_rank001.pt"}
        assert meta["loader_states"] == [{"rank": 0, "step": step}, {"rank": 1, "step": step}]
        model = _tiny_net()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        load_checkpoint(latest, model, torch.optim.AdamW(model.parameters()))
        assert any(p.abs().sum() > 0 for p in model.parameters())


def test_two_node_save_is_complete_on_both_views_once_the_store_settles(tmp_path):
    with ObjectStore(tmp_path / "s") as store:
        runs = [store.view(0) / "run", store.view(1) / "run"]
        res = _run_nodes(tmp_path, "save", runs, steps=[5, 10])
        assert all(r.get("ok") for r in res), res
        store.settle()
        _assert_latest_everywhere(store, 10)
        files = ["meta.json", "model.safetensors", "optim_rank000.pt", "optim_rank001.pt"]
        assert [k for k in store.keys() if "/base/" in k] == [f"run/base/ckpt_{s:06d}/{f}" for s in (5, 10)
                                                              for f in files]   # no temp dirs, no probes


def test_a_save_whose_files_never_become_visible_fails_in_one_line_and_commits_nothing(tmp_path):
    apart = [tmp_path / "n0" / "run", tmp_path / "n1" / "run"]      # two nodes that share nothing
    res = _run_nodes(tmp_path, "save", apart, wait_s=2, steps=[1])
    for r in res:
        msg = r.get("error", "")
        assert "was not saved" in msg and "optim_rank00" in msg and "\n" not in msg, res
    assert not list(tmp_path.glob("n*/run/base/ckpt_*/meta.json"))
    assert not list(tmp_path.glob("n*/run/base/ckpt_*/*"))           # each rank removed what it wrote


@pytest.mark.parametrize("die", [{"rank": 0, "step": 2, "at": "meta"}, {"rank": 1, "step": 2, "at": "shard"}])
def test_a_save_killed_half_way_leaves_the_previous_checkpoint_on_both_views(tmp_path, capsys, die):
    """kill -9 of a node before meta.json is committed (or half-way through a shard): every view's newest
    checkpoint is still the previous one, and the next save's rank 0 removes the unfinished step dir."""
    with ObjectStore(tmp_path / "s") as store:
        runs = [store.view(0) / "run", store.view(1) / "run"]
        res = _run_nodes(tmp_path, "save", runs, steps=[1, 2], die=die)
        assert res[0 if die["rank"] == 1 else 1].get("error") and "died" in res[die["rank"]], res
        store.settle()
        _assert_latest_everywhere(store, 1)
        assert "ckpt_000002" in capsys.readouterr().err                 # skipped, and said so

        res = _run_nodes(tmp_path, "save", runs, steps=[3])
        assert all(r.get("ok") for r in res), res
        store.settle()
        _assert_latest_everywhere(store, 3)
        assert not [k for k in store.keys() if k.startswith("run/base/ckpt_000002")]
        for node in (0, 1):
            assert not (store.view(node) / "run" / "base" / "ckpt_000002").exists()



# -----------------------------------------------------------------------------
# The pipeline on two nodes: the other node follows node 0's word, never its own (stale) view of the books

def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_pipelines(tmp_path: Path, store, stages: str, while_running=None) -> list[list[str]]:
    """Node 0's and node 1's real pipeline (stand-in stages, tests/stage_standins.py), each on its own view;
    returns the stages each node ran, as "<stage> <tokenizer sha prefix>" lines."""
    port, procs, logs = _free_port(), [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), SKYPILOT_NODE_RANK=str(node),
                   SKYPILOT_NODE_IPS="127.0.0.1\n127.0.0.1", NANOCHAT_LEAD_PORT=str(port), STANDIN_LOG=str(logs[-1]))
        procs.append(subprocess.Popen([PY, str(HERE / "stage_standins.py"), "pipeline", "--run-dir",
                                       str(store.view(node) / "run"), "--preset", "cloud", "--stages", stages,
                                       "--nnodes", "2", "--nproc-per-node", "1", "--deadline-at",
                                       str(time.time() + 600), "--base-deadline-at", str(time.time() + 600)],
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    if while_running:
        while_running()
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=60)[0])
        except subprocess.TimeoutExpired:
            p.kill()       # our own child, by its pid
            outs.append(p.communicate()[0])
    for p, out in zip(procs, outs):
        assert p.returncode == 0, "\n".join(outs)[-4000:]
    return [f.read_text().splitlines() if f.exists() else [] for f in logs]


def test_the_other_node_skips_what_node_0_skips_even_when_it_sees_an_older_stages_json(tmp_path):
    with ObjectStore(tmp_path / "s") as store:
        run0 = store.view(0) / "run"
        (run0 / "tokenizer").mkdir(parents=True)
        (run0 / "tokenizer" / "tokenizer.json").write_text("tok-v1")
        (run0 / "stages.json").write_text(json.dumps({"tok": {}}))
        store.settle()
        store.freeze(1)                  # node 1's listing of the run dir has not expired yet ...
        (run0 / "stages.json").write_text(json.dumps({"tok": {}, "base": {}}))   # ... when base is done
        ran = _two_pipelines(tmp_path, store, "tok,base,sft", while_running=lambda: (time.sleep(4),
                                                                                     store.freeze(1, False)))
    assert [r.split()[0] for r in ran[0]] == ["sft"]
    assert ran[1] == ran[0]              # node 1 ran base neither: its torchrun jobs pair up with node 0's


def test_the_other_node_trains_with_node_0s_new_tokenizer_not_the_older_one_it_still_sees(tmp_path):
    with ObjectStore(tmp_path / "s", dir_cache_s=1.5) as store:
        run0 = store.view(0) / "run"
        (run0 / "tokenizer").mkdir(parents=True)
        (run0 / "tokenizer" / "tokenizer.json").write_text("an older tokenizer")
        store.settle()
        ran = _two_pipelines(tmp_path, store, "tok,sft,report")
    assert [r.split()[0] for r in ran[0]] == ["tok", "sft", "report"]
    assert [r.split()[0] for r in ran[1]] == ["sft"]          # tok and report are node 0's alone
    assert ran[1][0] == ran[0][1]                               # the same tokenizer as node 0's sft

if __name__ == "__main__":
    _node_main(json.loads(sys.argv[1]))
