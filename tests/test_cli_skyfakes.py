"""
The cloud boundary for the CLI tests (a helper module, no tests in it): SkyPilot's catalog CSVs written
to a private SKY_RUNTIME_DIR, and the two sky.check functions SkyPilot's own tests patch to say which
clouds have credentials. Everything between - catalog reading, the optimizer, Task/Resources - is the real
SkyPilot 0.14.

SkyPilot fixes its catalog directory when `sky` is first imported, so SKY_RUNTIME_DIR is set here, at
import time of this module, before any test imports sky.
"""
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

if "sky" not in sys.modules:
    # NANOCHAT_TEST_SKY_RT: the slow API-server test shares one directory between client and server.
    os.environ["SKY_RUNTIME_DIR"] = os.environ.get("NANOCHAT_TEST_SKY_RT") or tempfile.mkdtemp(prefix="nanochat_sky_rt_")
SKY_RT = Path(os.environ.get("SKY_RUNTIME_DIR", str(Path.home())))
CATALOG = SKY_RT / ".sky" / "catalogs" / "v8"

GPU8 = "\"{'Gpus': [{'Name': 'H100', 'Manufacturer': 'NVIDIA', 'Count': 8, 'MemoryInfo': {'SizeInMiB': 81920}}], 'TotalGpuMemoryInMiB': 655360}\""
CSVS = {
    "common/accelerators.csv": """AcceleratorName,Clouds
H100,"AWS, GCP, Lambda, Nebius, RunPod"
A10G,AWS
A10,Lambda
L4,GCP
""",
    # AWS: on-demand + spot, two regions for the 8xH100 NVLink instance (us-east-1 with two zones whose spot
    # prices differ as AWS's do: the catalog lists the region at its cheapest zone), and a single-GPU instance.
    "aws/vms.csv": f"""InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone,Arch
p5.48xlarge,H100,8,192,2048,{GPU8},55.04,10.5,us-east-1,us-east-1a,x86_64
p5.48xlarge,H100,8,192,2048,{GPU8},55.04,17.63,us-east-1,us-east-1b,x86_64
p5.48xlarge,H100,8,192,2048,{GPU8},57.0,11.2,us-west-2,us-west-2a,x86_64
g5.xlarge,A10G,1,4,16,"{{'Gpus': [{{'Name': 'A10G', 'Count': 1, 'MemoryInfo': {{'SizeInMiB': 24576}}}}]}}",1.006,0.4,us-east-1,us-east-1a,x86_64
m6i.large,,,2,8,,0.096,0.04,us-east-1,us-east-1a,x86_64
m6i.xlarge,,,4,16,,0.192,0.08,us-east-1,us-east-1a,x86_64
m6i.xlarge,,,4,16,,0.202,0.09,us-west-2,us-west-2a,x86_64
""",
    # Lambda: on-demand only (no spot price).
    "lambda/vms.csv": f"""InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice
gpu_8x_h100_sxm5,H100,8,208,1800,31.92,us-east-1,{GPU8},
gpu_1x_a10,A10,1,30,200,0.75,us-east-1,"{{'Gpus': [{{'Name': 'A10', 'Count': 1, 'MemoryInfo': {{'SizeInMiB': 24576}}}}]}}",
""",
    # RunPod: the cheapest 8xH100 of all - but PCIe (a bare "H100" on RunPod): must be excluded by default.
    "runpod/vms.csv": f"""InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Region,SpotPrice,Price,AvailabilityZone,GpuInfo
8x_H100_SECURE,H100,8,128,1000,CA,,23.12,CA-MTL-1,{GPU8}
""",
    # Nebius: SXM, on-demand and spot.
    "nebius/vms.csv": """InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice
gpu-h100-sxm_8gpu-128vcpu-1600gb,H100,8,128,1600,23.6,eu-north1,H100,10.0
cpu-d3_4vcpu-16gb,,,4,16,0.12,eu-north1,,
""",
}
# No gcp/vms.csv on purpose: that cloud's catalog "cannot be fetched" (the proxy below refuses) -> skipped.


def write_catalogs() -> None:
    for rel, text in CSVS.items():
        p = CATALOG / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists() or p.read_text() != text:
            p.write_text(text)  # no .meta/*.md5 beside it: SkyPilot treats it as user-edited, never refetches


@contextlib.contextmanager
def cloud_boundary(enabled: list[str], monkeypatch):
    """Catalogs on disk, no network (a refused proxy makes any catalog download fail at once), and
    `enabled` as the clouds with credentials."""
    write_catalogs()
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("NANOCHAT_CATALOG_TIMEOUT", "20")
    from sky import check as sky_check
    from sky.utils import registry
    clouds = [registry.CLOUD_REGISTRY.from_str(c) for c in enabled]
    with mock.patch.object(sky_check, "get_cached_enabled_clouds_or_refresh", return_value=clouds), \
         mock.patch.object(sky_check, "check_capability", return_value={"default": list(enabled)}):
        yield
