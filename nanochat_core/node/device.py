"""
What the accelerator this process runs on can do: its peak FLOP/s for MFU (the datasheet's, datasheet.py, on a
GPU; an estimate from the CPU's clock and SIMD width on a CPU), a measured matmul peak and copy bandwidth, peak
memory, and FP8 conversion. Only the stages, the preflight and the benchmarks import it (torch at the top).
"""
from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch

from nanochat_core.common import NanochatError, autodetect_device_type
from nanochat_core.node.datasheet import peak_bf16


def allow_tf32() -> None:
    """fp32 matmuls on tensor cores (TF32): what every fp32 op left under bf16 autocast should use on a GPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def open_device(device_type: str | None = None):
    """The torch.device a single-process tool (a benchmark, the preflight) runs on: --device or autodetected,
    the first GPU on CUDA, with TF32 allowed there."""
    device_type = device_type or autodetect_device_type()
    if device_type != "cuda":
        return torch.device(device_type)
    allow_tf32()
    return torch.device("cuda", 0)


def device_peak_flops(device: Any = None) -> float:
    """Peak dense FLOP/s of the device for the dtype we train in (bf16 on GPU, fp32 on CPU).
    CPU: a rough per-core estimate (AVX2 FMA, fp32) - MFU on CPU is only indicative."""
    dev = torch.device(device) if device is not None else torch.device(autodetect_device_type())
    if dev.type == "cuda":
        # unknown GPU: a conservative placeholder, stated as such in bench output
        return peak_bf16(torch.cuda.get_device_name(dev)) or 100e12
    return torch.get_num_threads() * _cpu_core_peak_flops()


def _cpu_core_peak_flops() -> float:
    """fp32 FLOP/s of one core: clock x SIMD lanes x 2 (FMA) x 2 FMA units. AVX-512: 16 lanes,
    AVX2: 8, otherwise SSE's 4. The clock is the one /proc/cpuinfo reports (2.5 GHz if unknown)."""
    ghz, lanes = 2.5, 4
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            if line.startswith("cpu MHz"):
                ghz = float(line.split(":")[1]) / 1000
                break
        lanes = 16 if " avx512f" in info else 8 if " avx2" in info else 4
    except (OSError, ValueError):
        pass
    return ghz * 1e9 * lanes * 2 * 2


def measure_matmul_peak(device, device_type: str) -> float:
    """FLOP/s of a large square matmul in the training dtype (bf16 on CUDA, fp32 on CPU): the best this
    device does in practice, so 'MFU vs measured' separates our overheads from the hardware's ceiling."""
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
    if device_type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device_type: str) -> float:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB; whole process, indicative


def apply_fp8(model) -> None:
    """FP8 (e4m3 forward, tensorwise scales) for the transformer's Linear layers via torchao, which is what
    gave the reference 1.17x tokens/s at d26. The lm_head stays bf16 (its logits feed the softcap)."""
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
