"""One slow test: the CLI's SkyPilot adapter against a REAL local SkyPilot API server (no cloud, no
network): `SkyBackend.launch(..., dryrun=True)` sends our train.yaml task, built exactly as `nanochat train`
builds it, through sky.launch; the server's optimizer must place it on the offer we asked for.

The server runs in a child process with its own HOME/SKY_RUNTIME_DIR (so nothing touches ~/.sky), reads
the catalog files the test writes, and gets its enabled clouds seeded after its on-boot check (which
would otherwise record "no cloud"). Everything is time-bounded and the server is always stopped.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()


@pytest.mark.slow
@pytest.mark.needs_tool("rsync")   # SkyPilot's launch checks for rsync (it syncs the workdir with it)
def test_launch_dryrun_through_a_real_api_server(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("SKYPILOT_DISABLE_LOCAL_API_SERVER", None)   # this test starts a real server on purpose
    proc = subprocess.Popen([sys.executable, str(HERE), str(tmp_path / "sky")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=170)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("API server test timed out:\n" + out[-3000:])
    result = next((json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    assert result is not None, out[-3000:]
    assert result["error"] is None, result["error"]
    assert "Lambda (us-east-1)" in result["output"] and "gpu_8x_h100_sxm5" in result["output"]
    assert "Dryrun finished" in result["output"]
    assert result["recorded_job"] is False


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _drive(base: Path) -> dict:
    """Runs in the child: start the server, seed clouds, launch a dry run, stop the server."""
    import contextlib
    import io
    from nanochat_core.node.proctree import become_subreaper, kill_tree
    # The server's request executors and multiprocessing's resource trackers ignore SIGTERM and outlive the
    # server (a suite once left 12 executors and 2 trackers running, 2 GB). As a subreaper we stay their parent
    # when the server is gone, so the kill at the end still finds every one of them.
    become_subreaper()
    base.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    os.environ.update(HOME=str(base), SKY_RUNTIME_DIR=str(base), NANOCHAT_TEST_SKY_RT=str(base),
                      NANOCHAT_HOME=str(base / "nanochat_home"),
                      SKYPILOT_API_SERVER_LOCAL_PORT=str(port), SKYPILOT_API_SERVER_ENDPOINT=f"http://127.0.0.1:{port}",
                      HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                      NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    (base / ".sky").mkdir(exist_ok=True)
    # Only these clouds are checked at boot: keeps the server's start-up short and offline.
    (base / ".sky" / "config.yaml").write_text("allowed_clouds: [lambda]\n")
    import test_cli_skyfakes
    test_cli_skyfakes.write_catalogs()
    sky_cli = str(Path(sys.executable).parent / "sky")
    log = open(base / "server.log", "w")
    server = subprocess.Popen([sky_cli, "api", "start", "--foreground", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=log, start_new_session=True)
    result = {"output": "", "error": None, "recorded_job": None, "timings": {}}
    t0 = time.time()
    try:
        import httpx
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("API server did not become healthy:\n" + (base / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        result["timings"]["healthy"] = round(time.time() - t0, 1)
        import sky
        from sky import global_user_state
        from sky.check import _get_workspace_allowed_clouds
        from sky.clouds import cloud as sky_cloud
        with contextlib.suppress(Exception):
            sky.get("skypilot-server-on-boot-check")   # wait for it: it would overwrite what we seed
        result["timings"]["boot_check"] = round(time.time() - t0, 1)
        global_user_state.set_allowed_clouds(_get_workspace_allowed_clouds("default"), "default")
        global_user_state.set_enabled_clouds(["Lambda"], sky_cloud.CloudCapability.COMPUTE, "default")

        from nanochat_cli import state
        from nanochat_cli.backends.skypilot import SkyBackend
        offer = {"cloud": "lambda", "region": "us-east-1", "instance_type": "gpu_8x_h100_sxm5",
                 "accelerators": "H100:8", "spot": False, "price_per_hour": 31.92, "interconnect": "nvlink",
                 "enabled": True}
        rec = state.new_cluster_record("nanochat-dry", "sky", offer, autostop_minutes=10)
        rd = state.run_dir("d12")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            from nanochat_core import run_spec
            rd.mkdir(parents=True, exist_ok=True)
            spec_file = run_spec.write(rd, run_spec.RunSpec(run="d12", preset="cloud", offer=offer,
                                                            deadline_at=time.time() + 3600))
            SkyBackend().launch(rec, rd, ["--preset", "cloud", "--depth", "12"], spec_file, dryrun=True)
        result["output"] = buf.getvalue()
        result["timings"]["dryrun"] = round(time.time() - t0, 1)
        result["recorded_job"] = state.read_job(rd) is not None
    except Exception as e:  # reported to the test, which shows it
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(20)
        # whatever is still below us - the server's group, executors in their own sessions, orphans - goes too
        kill_tree(os.getpid(), grace_s=5, include_self=False)
        server.wait()
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(_drive(Path(sys.argv[1]))), flush=True)
