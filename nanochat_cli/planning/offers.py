"""
Offers as nanochat ranks them: what a GPU request means, how an offer's interconnect is labelled, and which
offers a launch may fail over to. Pure data and rules - the catalog reading itself is in backends/skypilot.py.

Interconnect rule (how an offer is labelled, from the catalog alone):
  * one GPU                                                 -> "single-gpu"
  * "PCIe" in the accelerator name, instance type or GpuInfo -> "pcie"
  * "SXM" / "NVLink" in any of them, or an instance family that only exists with NVLink/NVSwitch
    (AWS p4d/p4de/p5*/p6*, GCP a2-/a3-/a4-, Azure ND*, Nebius gpu-*-sxm, Lambda gpu_8x_*) -> "nvlink"
  * RunPod with a bare name (no "-SXM")                     -> "pcie": RunPod calls its SXM parts "H100-SXM";
    SkyPilot's own RunPod catalog fetcher maps "H100-PCIe" to the plain "H100"
  * anything else                                           -> "unknown" (kept, shown as such)
Multi-GPU "pcie" offers are excluded unless --allow-pcie: 8 GPUs without NVLink train several times slower.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from nanochat_core.common import NanochatError

GPU_CLOUDS = ["aws", "gcp", "azure", "lambda", "nebius", "runpod", "oci", "paperspace", "fluidstack", "cudo",
              "vast", "do", "hyperbolic", "shadeform", "primeintellect", "verda", "mithril", "seeweb", "yotta"]
NVLINK_FAMILIES = ("p4d.", "p4de.", "p5.", "p5e.", "p5en.", "p6-", "p6e-", "a2-", "a3-", "a4-", "standard_nd",
                   "gpu_8x_", "gpu-h100-sxm", "gpu-h200-sxm", "gpu-b200")


@dataclass
class Offers:
    offers: list[dict]                                   # cheapest first, as `up --json` prints them
    notes: list[str] = field(default_factory=list)       # skipped clouds, exclusions
    enabled: list[str] = field(default_factory=list)     # clouds with credentials on this machine


def parse_gpus(gpus: str) -> tuple[str, int]:
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9_.-]*)\s*(?::\s*(\d+))?\s*", gpus or "")
    if not m or (m.group(2) is not None and int(m.group(2)) < 1):
        raise NanochatError(f"--gpus must look like H100:8 (GPU name, colon, count), got '{gpus}'")
    return m.group(1), int(m.group(2) or 1)


def interconnect(cloud: str, acc: str, count: float, instance_type: str | None, gpu_info: str | None) -> str:
    if count <= 1:
        return "single-gpu"
    text = " ".join([acc or "", instance_type or "", gpu_info or ""]).lower()
    if "pcie" in text:
        return "pcie"
    if "sxm" in text or "nvlink" in text or (instance_type or "").lower().startswith(NVLINK_FAMILIES):
        return "nvlink"
    if cloud.lower() == "runpod":
        return "pcie"
    return "unknown"


def failover_candidates(result: Offers, chosen: dict, n: int = 8) -> list[dict]:
    """The chosen offer first, then the next cheapest enabled ones of the same interconnect class: the
    set SkyPilot may fail over to when the first has no capacity."""
    rest = [o for o in result.offers if o["enabled"] and o != chosen and o["interconnect"] == chosen["interconnect"]]
    return [chosen] + rest[:n - 1]


