"""
What vendors' datasheets say an accelerator can do: dense bf16 FLOP/s. Torch-free, because the CLI's planner
prices runs with it; the node reports MFU against the same numbers (device.py).
"""
from __future__ import annotations

# Dense bf16 tensor-core peaks from vendor datasheets (FLOP/s, no sparsity). MFU is reported
# against these; the benchmark also reports against a measured matmul peak.
PEAK_BF16 = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12),
    ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12),
]


def peak_bf16(gpu_name: str) -> float | None:
    """Datasheet dense bf16 FLOP/s for a GPU name as CUDA ("NVIDIA H100 80GB HBM3") or a catalog ("H100",
    "A100-80GB", "H100-SXM") spells it; None if unknown. First match wins, so the longer names come first."""
    name = gpu_name.upper().replace("-", " ")
    for key, flops in PEAK_BF16:
        if key.upper() in name:
            return flops
    return None
