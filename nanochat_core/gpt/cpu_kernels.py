"""
The C kernels of CPU decode (cpu_kernels.c): compiled once per machine with the system C compiler, cached under
nanochat_home()/kernels, loaded with ctypes. quantize.py's int8/int4 matrix-vector products use them, and
model.py's decode steps (attend_decode, rms_norm, decode_blocks below). No compiler, or NANOCHAT_NO_KERNEL=1: kernel() returns
None and every caller takes its torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from nanochat_core.common import nanochat_home

KERNEL_SRC = (Path(__file__).parent / "cpu_kernels.c").read_text()
_KERNEL: Any = None      # the ctypes library once built, False when it cannot be (no compiler): fall back
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3", "-mcpu=native"], ["-O3"])
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
_SIGNATURES = {"i8_linear": [_P] * 4 + [_L] * 3 + [_I],
               "i4_linear": [_P] * 4 + [_L] * 3 + [_I] * 2,
               "i4_linear3": [_P, _L, _L, _I] + ([_P] * 3 + [_L]) * 3,
               "i4_mlp": [_P, _L, _L, _I] + [_P] * 2 + [_L] + [_P] * 3 + [_L],
               "i4_dequant": [_P] * 3 + [_L] * 2 + [_I] * 2,
               "attn_decode": [_P] * 8 + [_L] * 7 + [_F] + [_P] * 2 + [_L, _P, _L, _F],
               "block_decode": ([_P, _P, _F, _F] + [_L] * 5 + [ctypes.POINTER(_P)] * 2 + [_P, _P, _L, _F]
                                + [_P] * 4 + [_L] * 3 + [_F, _I]),
               "rms_norm": [_P] * 2 + [_L] * 2 + [_F],
               "i8_rows": [_P] * 4 + [_L] * 3}
_RESTYPES = {"i8_rows": ctypes.c_int}
DECODE_MAX = 16384   # elements: a decode step's activations (a few rows), where one C call beats torch's ops


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def kernel(name: str, quiet: bool = False):
    """The compiled function `name` of cpu_kernels.c (one of _SIGNATURES, as a ctypes function), or None when
    this machine cannot build the kernels. Built once per machine + source (the .so is cached by a hash of both), in a temp
    file renamed into place."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build(quiet) or False
    return getattr(_KERNEL, name) if _KERNEL else None


def _build(quiet: bool):
    if os.environ.get("NANOCHAT_NO_KERNEL") == "1":   # tests and the benchmark's fallback row
        return None
    cc = _compiler()
    if cc is None:
        if not quiet:
            print("note: no C compiler found: CPU decode uses torch's slower paths (install gcc or clang)",
                  file=sys.stderr)
        return None
    tag = hashlib.sha256(f"{KERNEL_SRC}{platform.machine()}{platform.processor()}{sys.platform}".encode()).hexdigest()[:16]
    out_dir = nanochat_home() / "kernels"
    lib = out_dir / f"cpu_kernels-{tag}.so"
    if not lib.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src = Path(tmp) / "cpu_kernels.c"
            src.write_text(KERNEL_SRC)
            for flags in _FLAG_SETS:
                so = Path(tmp) / "k.so"
                r = subprocess.run([cc, *flags, "-shared", "-fPIC", str(src), "-o", str(so)],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    os.replace(so, lib)
                    break
            else:
                if not quiet:
                    print(f"note: the CPU decode kernels did not compile ({r.stderr.strip()[:160]}); using torch's "
                          "slower fallback", file=sys.stderr)
                return None
    dll = ctypes.CDLL(str(lib))
    for name, args in _SIGNATURES.items():
        getattr(dll, name).argtypes = args
        getattr(dll, name).restype = _RESTYPES.get(name)
    return dll


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  kv_cache: Any, layer_idx: int, window: int | None, ve: tuple | None = None) -> torch.Tensor | None:
    """One decode step of attention on the CPU in one C call (cpu_kernels.c's attn_decode): the value embedding's
    gated mix (ve = (embedding rows, the layer's normed input x, the gate's weight, its scale), or None), QK-norm,
    rotary, the cache write and attention over the cache, for q (B, H, 1, D), k and v (B, Hkv, 1, D) fp32, with
    q and k normed and rotated in place. Returns y (B, H, D), or None when this is not such a step or there is no
    kernel: the caller then takes the torch path, which computes the same (tests/test_cpu_kernels.py checks it).
    Measured on a d20 step: in a decode step each small torch op costs 10-40 us (its code and data are cold
    after the weights stream through the caches), and attention was ~40 of them per layer (docs/PERFORMANCE.md)."""
    reserve = getattr(kv_cache, "reserve", None)   # engine.KVCache has it; a cache with only the protocol not
    if not (q.dtype == k.dtype == v.dtype == torch.float32 and q.device.type == "cpu" and q.size(2) == 1
            and not torch.is_grad_enabled() and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
            and reserve is not None):
        return None
    rows, x, gate_w, gate_scale = ve if ve is not None else (None, None, None, 0.0)
    if ve is not None and not (rows.dtype == x.dtype == gate_w.dtype == torch.float32 and rows.is_contiguous()
                               and x.is_contiguous() and gate_w.is_contiguous()):
        return None
    fn = kernel("attn_decode")
    if fn is None:
        return None
    B, H, _, D = q.shape
    Hkv = k.size(1)
    kc, vc = reserve(layer_idx, 1, q.dtype, q.device)
    if kc.dtype != torch.float32:
        return None
    y = torch.empty(B, H, D)
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(),
       y.data_ptr(), B, H, Hkv, D, kc.size(2), kv_cache.get_pos(), window or 0, torch.finfo(torch.float32).eps,
       *((rows.data_ptr(), x.data_ptr(), x.size(-1), gate_w.data_ptr(), gate_w.size(1), gate_scale)
         if ve is not None else (None, None, 0, None, 0, 0.0)))
    return y


def rms_norm(x: torch.Tensor) -> torch.Tensor | None:
    """model.norm of a decode step's few fp32 rows on the CPU in one C call, or None (the caller uses torch)."""
    if x.dtype != torch.float32 or x.numel() > DECODE_MAX or x.device.type != "cpu" or torch.is_grad_enabled() \
            or not x.is_contiguous() or (fn := kernel("rms_norm")) is None:
        return None
    y = torch.empty_like(x)
    fn(x.data_ptr(), y.data_ptr(), x.numel() // x.size(-1), x.size(-1), torch.finfo(torch.float32).eps)
    return y


def decode_blocks(model: Any, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, kv_cache: Any, lambdas: list) -> tuple | None:
    """GPT.forward's loop over the blocks for a decode step of an int4 model on the CPU: one C call per block
    (cpu_kernels.c's block_decode) instead of ~200 Python and torch calls. Returns (x, the stream saved for
    backout or None), or None when this is not such a step (the caller runs its own loop, which computes the
    same: tests/test_cpu_kernels.py)."""
    blocks, cfg = model.transformer.h, model.config
    fn = kernel("block_decode")
    reserve = getattr(kv_cache, "reserve", None)
    if (fn is None or reserve is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.size(1) != 1
            or x.size(0) > 16 or torch.is_grad_enabled()):
        return None
    mats = [(b.attn.c_q, b.attn.c_k, b.attn.c_v, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in blocks]
    if any(getattr(m, "fmt", None) != "int4" for ms in mats for m in ms) or reserve(0, 1, x.dtype, x.device)[0].dtype != x.dtype:
        return None
    x = x.contiguous().clone()   # block_decode updates it in place; x0 must stay as it is
    x0 = x0.contiguous()
    B, _, C = x.shape
    pos, eps, threads = kv_cache.get_pos(), torch.finfo(torch.float32).eps, torch.get_num_threads()
    x_backout = None
    for i, (block, ms) in enumerate(zip(blocks, mats)):
        ve = model.value_embeds[str(i)](idx) if str(i) in model.value_embeds else None
        gate = block.attn.ve_gate.weight if ve is not None else None
        if ve is not None and not (ve.dtype == gate.dtype == torch.float32 and ve.is_contiguous()):
            raise ValueError("a value embedding or its gate is not fp32")   # cannot happen for an int4 GPT
        kc, vc = reserve(i, 1, x.dtype, x.device)
        fn(x.data_ptr(), x0.data_ptr(), lambdas[i][0], lambdas[i][1], B, C, cfg.n_head, cfg.n_kv_head, cfg.head_dim,
           (_P * 6)(*(m.weight.data_ptr() for m in ms)), (_P * 6)(*(m.scale.data_ptr() for m in ms)),
           ve.data_ptr() if ve is not None else None, gate.data_ptr() if ve is not None else None,
           gate.size(1) if ve is not None else 0, block.attn.ve_gate_scale, cos.data_ptr(), sin.data_ptr(),
           kc.data_ptr(), vc.data_ptr(), kc.size(2), pos, model.window_sizes[i] or 0, eps, threads)
        if cfg.backout and i == cfg.n_layer // 2:
            x_backout = x.clone()
    return x, x_backout
