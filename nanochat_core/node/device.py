"""
What an accelerator can do, in one place: its datasheet bf16 peak (the planner prices runs with it, MFU is
reported against it), a measured matmul peak, peak memory, and FP8 conversion. Torch is imported inside the
functions: the CLI's planner imports this module without it.
"""
from __future__ import annotations

import time

from nanochat_core.common import NanochatError, autodetect_device_type
import resource

# Dense bf16 tensor-core peaks from vendor datasheets (FLOP/s, no sparsity). MFU is reported
# against these; the benchmark also reports against a measured matmul peak.
PEAK_BF16 = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12),
    ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12),
]



def allow_tf32() -> None:
    """fp32 matmuls on tensor cores (TF32): what every fp32 op left under bf16 autocast should use on a GPU."""
    import torch   # lazy: the CLI imports this module, and must not load torch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def open_device(device_type: str | None = None):
    """The torch.device a single-process tool (a benchmark, the preflight) runs on: --device or autodetected,
    the first GPU on CUDA, with TF32 allowed there."""
    import torch   # lazy: the CLI imports this module, and must not load torch
    device_type = device_type or autodetect_device_type()
    if device_type != "cuda":
        return torch.device(device_type)
    allow_tf32()
    return torch.device("cuda", 0)


def peak_bf16(gpu_name: str) -> float | None:
    """Datasheet dense bf16 FLOP/s for a GPU name as CUDA ("NVIDIA H100 80GB HBM3") or a catalog ("H100",
    "A100-80GB", "H100-SXM") spells it; None if unknown. First match wins, so the longer names come first."""
    name = gpu_name.upper().replace("-", " ")
    for key, flops in PEAK_BF16:
        if key.upper() in name:
            return flops
    return None


def measure_matmul_peak(device, device_type: str) -> float:
    """FLOP/s of a large square matmul in the training dtype (bf16 on CUDA, fp32 on CPU): the best this
    device does in practice, so 'MFU vs measured' separates our overheads from the hardware's ceiling."""
    import torch   # lazy: the CLI imports this module, and must not load torch
    n, dtype, reps = (8192, torch.bfloat16, 20) if device_type == "cuda" else (512, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device_type)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device_type)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def sync(device_type: str) -> None:
    import torch   # lazy: the CLI imports this module, and must not load torch
    if device_type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device_type: str) -> float:
    import torch   # lazy: the CLI imports this module, and must not load torch
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB; whole process, indicative


def apply_fp8(model) -> None:
    """FP8 (e4m3 forward, tensorwise scales) for the transformer's Linear layers via torchao, which is what
    gave the reference 1.17x tokens/s at d26. The lm_head stays bf16 (its logits feed the softcap)."""
    import torch   # lazy: the CLI imports this module, and must not load torch
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise NanochatError("--fp8 on needs an FP8 GPU (H100/H200/L40S/RTX 4090 or newer)")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise NanochatError("--fp8 on needs torchao: pip install torchao") from None
    convert_to_float8_training(model.transformer.h)


def copy_bandwidth(device, megabytes: int) -> float:
    """Bytes/s moved by a large device-to-device copy (read + write counted), best of a few runs: the memory
    bandwidth that bounds a decode step (the inference benchmark and the preflight compare against it)."""
    import torch   # lazy: the CLI imports this module, and must not load torch
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        dst.copy_(src)   # warm-up (first touch of the pages, clocks)
    for _ in range(5):
        sync(device.type)
        t0 = time.perf_counter()
        for _ in range(4):
            dst.copy_(src)
        sync(device.type)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * src.nbytes / best
