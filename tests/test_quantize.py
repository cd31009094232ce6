"""Inference weight formats (quantize.py) and the inference load path: the int8 kernel against fp32, the
quantised model against the fp32 one, the copy cached next to a checkpoint (reused, and rebuilt when the
checkpoint changes), memory-mapped loading, and how chat/serve pick a device and a format."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from nanochat_core.gpt import checkpoint, cpu_kernels, quantize
from nanochat_core.common import NanochatError
from nanochat_core.inference.engine import Engine, KVCache
from nanochat_core.gpt.model import GPT, config_for_depth


def _checkpoint(root, tokenizer, seed: int):
    """A run dir with one saved base checkpoint of a depth-1 model whose every weight is non-trivial."""
    from nanochat_core.gpt.checkpoint import save_checkpoint
    tokenizer.save(root / "tokenizer")
    cfg = config_for_depth(1, tokenizer.get_vocab_size(), sequence_len=64, head_dim=32)
    torch.manual_seed(seed)
    model = GPT.build(cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = save_checkpoint(root / "base", 1, model, torch.optim.AdamW(model.parameters()),
                           {"tokenizer_hash": tokenizer.hash}, 0, 1)
    return model.eval(), ckpt


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("M", [1, 3, 16])
def test_the_int8_kernel_computes_the_dequantised_matmul(M):
    """Odd sizes on purpose: N not a multiple of the kernel's 4 rows, K not a multiple of its vector width."""
    fn = cpu_kernels.kernel("i8_linear")
    if fn is None:
        pytest.skip("no C compiler on this machine: the fallback path is what runs (tested below)")
    torch.manual_seed(0)
    N, K = 37, 45
    q, s = quantize.quantize_rows(torch.randn(N, K))
    x = torch.randn(M, K)
    y = torch.empty(M, N)
    fn(x.data_ptr(), q.data_ptr(), s.data_ptr(), y.data_ptr(), M, N, K, 1)
    ref = F.linear(x.double(), q.double()) * s.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def _int4_bound(x: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    """How far the int4 kernel may be from x @ deq.T: its AVX512-VNNI path rounds x to int8, one scale
    (max-abs / 127) per group of 32, so each x moves by <= half its group's step; |error| <= sum |w| * step / 2."""
    step = x.abs().reshape(x.size(0), -1, quantize.GROUP).amax(-1) / 127
    return (deq.abs().reshape(deq.size(0), -1, quantize.GROUP).sum(-1).double() @ step.double().T).T / 2


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("K", [96, 128])   # an odd number of groups (the float path), an even one (VNNI on x86)
def test_the_int4_kernel_computes_the_dequantised_matmul(M, K):
    fn = cpu_kernels.kernel("i4_linear")
    if fn is None:
        pytest.skip("no C compiler on this machine: the fallback path is what runs (tested below)")
    torch.manual_seed(0)
    N = 37
    packed, scale = quantize.quantize_groups(torch.randn(N, K))
    deq = quantize.dequantize_groups(packed, scale)
    x = torch.randn(M, K)
    y = torch.empty(M, N)
    fn(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), y.data_ptr(), M, N, K, 2, 0)
    ref = F.linear(x.double(), deq.double())
    act = torch.empty(M, N)   # the MLP's activation on the way out: exactly relu(y)^2
    fn(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), act.data_ptr(), M, N, K, 2, 1)
    assert torch.equal(act, F.relu(y).square())
    assert ((y.double() - ref).abs() <= _int4_bound(x, deq) * 1.001 + 1e-4).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 0.01
    # the three-matrix call (attention's q, k, v) gives each matrix exactly what its own call gives
    mods = [quantize.QuantLinear.from_float(torch.randn(n, K), "int4") for n in (N, 8, 5)]
    with torch.inference_mode():
        together = quantize.project3(*mods, x[:, None, :])
        for mod, got in zip(mods, together):
            assert torch.equal(got, mod(x[:, None, :])) and got.shape == (M, 1, mod.out_features)
        # and the MLP's two matrices in one call give what the two calls give
        up = quantize.QuantLinear.from_float(torch.randn(64, K), "int4")
        down = quantize.QuantLinear.from_float(torch.randn(9, 64), "int4")
        assert torch.equal(quantize.mlp2(up, down, x[:, None, :]), down(up(x[:, None, :], relu2=True)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_unpacks_the_same_in_c_and_in_torch(dtype, monkeypatch):
    """Prefill and eval multiply by the unpacked matrix: the C unpacker (fp32, or bf16 rounded to nearest even)
    and torch's, which runs without a C compiler, give the same bits."""
    torch.manual_seed(0)
    packed, scale = quantize.quantize_groups(torch.randn(37, 96))
    fast = quantize.dequantize_groups(packed, scale, dtype)
    monkeypatch.setattr(cpu_kernels, "_KERNEL", False)
    slow = quantize.dequantize_groups(packed, scale, dtype)
    assert fast.dtype == slow.dtype == dtype and torch.equal(fast, slow)


def test_int4_groups_round_each_weight_to_its_groups_grid(monkeypatch):
    """Per group of 32: the weights sit on the group's grid of 16 levels, each within half a step unless the
    scale search chose to clip the group's largest ones; and the search never does worse (in squared error)
    than the plain max-abs scale, which it tries first."""
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.rand(16, 1)
    w[3, :32] = 0                                          # an all-zero group stays zero
    packed, scale = quantize.quantize_groups(w)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 128) and scale.shape == (16, 8)
    deq = quantize.dequantize_groups(packed, scale)
    err = (deq - w).abs().reshape(16, 8, 32)
    step = scale.float().abs()[..., None]
    big = w.reshape(16, 8, 32).abs().amax(-1, keepdim=True)
    inside = w.reshape(16, 8, 32).abs() <= 7 * step        # not clipped by the grid's ends
    assert (err[inside.expand_as(err)] <= (step / 2 + 1e-6).expand_as(err)[inside.expand_as(err)]).all()
    assert (err <= big * 0.16 + step).all()                # a clipped weight loses at most the search's 15%
    assert (deq[3, :32] == 0).all()
    assert 0.05 < ((deq - w).norm() / w.norm()).item() < 0.12   # int4's rounding is ~9% of the weights' norm
    monkeypatch.setattr(quantize, "SCALE_TRIES", (1.0,))
    plain = quantize.dequantize_groups(*quantize.quantize_groups(w))
    per_group = lambda d: ((d - w) ** 2).reshape(16, 8, 32).sum(-1)
    assert (per_group(deq) <= per_group(plain) + 1e-9).all() and per_group(deq).sum() < per_group(plain).sum()


@pytest.mark.parametrize("rows", [1, 8, 40])   # decode (kernel), small batch (kernel), prefill (dequantise)
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantised_linear_is_close_to_fp32(rows, kernel, fmt, monkeypatch):
    if not kernel:
        monkeypatch.setattr(cpu_kernels, "_KERNEL", False)   # as on a machine without a C compiler
    torch.manual_seed(0)
    w = torch.randn(96, 128) / 128 ** 0.5
    x = torch.randn(2, rows, 128)
    lin = quantize.QuantLinear.from_float(w, fmt)
    if fmt == "int8":
        assert lin.weight.dtype == torch.int8 and lin.scale.shape == (96,)
    else:
        assert lin.weight.dtype == torch.uint8 and lin.weight.shape == (96, 64) and lin.scale.shape == (96, 4)
    with torch.inference_mode():
        y, ref = lin(x), F.linear(x, w)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # per-row int8 rounds each weight by <= scale/2: ~0.4% of the row's largest weight; int4 by ~9% of the
    # norm; with bf16 activations (the prefill path on bf16 CPUs) another ~0.4%
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < (0.02 if fmt == "int8" else 0.12), rel
    # and it is the matmul of the dequantised weights, not merely something close to fp32
    deq_w = lin.weight.float() * lin.scale[:, None] if fmt == "int8" else quantize.dequantize_groups(lin.weight, lin.scale)
    deq = F.linear(x, deq_w)
    kernel_ran = kernel and rows <= quantize.KERNEL_MAX_ROWS and cpu_kernels.kernel("i8_linear") is not None
    if fmt == "int8" or not kernel_ran:   # int8's kernel is fp32 throughout; the fallbacks may round x to bf16
        assert ((y - deq).norm() / deq.norm()).item() < (1e-5 if kernel_ran else 0.01)
    else:   # int4's kernel may round x to int8 per group (VNNI): within that rounding's bound
        assert ((y - deq).abs() <= _int4_bound(x.reshape(-1, 128), deq_w).reshape(y.shape) * 1.001 + 1e-4).all()


@pytest.mark.parametrize("decode", [False, True])   # torch's ops, or (a decode step) one C call
def test_int8_embedding_rows_are_the_dequantised_rows(decode):
    torch.manual_seed(0)
    w = torch.randn(50, 24)
    emb = quantize.QuantEmbedding.from_float(w, "int8")
    idx = torch.tensor([[0, 7, 49], [3, 3, 1]])
    with torch.inference_mode(decode):
        rows = emb(idx)
        with pytest.raises(IndexError, match="index out of range"):
            emb(torch.tensor([[0, 50]]))
    torch.testing.assert_close(rows, w[idx], atol=(w.abs().amax(1).max() / 127).item(), rtol=0)
    assert torch.equal(rows, emb.weight[idx].float() * emb.scale[idx, None])


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_quantised_model_follows_the_fp32_model(fmt, tiny_tokenizer, tmp_path):
    """The whole model through load_model: logits close to fp32's, and decoding with the KV cache gives what a
    full recomputation gives (the cache holds the same keys/values whatever path each matmul took)."""
    model, ckpt = _checkpoint(tmp_path / "run", tiny_tokenizer, 0)
    qmodel, _, meta = checkpoint.load_model(ckpt, "cpu", dtype=fmt)
    assert meta["dtype"] == fmt and quantize.describe(qmodel) == fmt
    assert quantize.weight_bytes_read(qmodel) < quantize.weight_bytes_read(model) / {"bf16": 1.9, "int8": 3.5, "int4": 5}[fmt]
    idx = torch.randint(0, tiny_tokenizer.get_vocab_size(), (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, full = model(idx), qmodel(idx)
        cache = KVCache.for_model(qmodel, 1, 24)
        stepped = torch.cat([qmodel(idx[:, :8], kv_cache=cache)] + [qmodel(idx[:, t:t + 1], kv_cache=cache)
                                                                     for t in range(8, 24)], dim=1)
    assert ((full - ref).norm() / ref.norm()).item() < (0.15 if fmt == "int4" else 0.03)
    torch.testing.assert_close(stepped, full, atol=0.05 * ref.abs().max().item(), rtol=0)


def test_the_format_copy_is_cached_reused_and_rebuilt_when_the_checkpoint_changes(tiny_tokenizer, tmp_path):
    model_a, ckpt = _checkpoint(tmp_path / "a", tiny_tokenizer, 0)
    idx = torch.randint(0, tiny_tokenizer.get_vocab_size(), (1, 12), generator=torch.Generator().manual_seed(2))
    first, _, meta = checkpoint.load_model(ckpt, "cpu", dtype="int8")
    cache = checkpoint.quantized_cache_path(ckpt, "int8")
    assert cache.is_file() and "cached as" in meta["load_how"]
    again, _, meta = checkpoint.load_model(ckpt, "cpu", dtype="int8")
    assert meta["load_how"] == "cached int8 copy"
    _same_weights(first, again)   # the cached copy IS the conversion, bit for bit
    # the checkpoint is replaced in place (a re-pull rsyncs new weights and meta.json into the same dir) and
    # the stale int8 copy stays behind: it must not be used
    model_b, ckpt_b = _checkpoint(tmp_path / "b", tiny_tokenizer, 1)
    for name in ("model.safetensors", "meta.json"):
        shutil.copy(ckpt_b / name, ckpt / name)
    rebuilt, _, meta = checkpoint.load_model(ckpt, "cpu", dtype="int8")
    assert "cached as" in meta["load_how"]
    fresh, _, _ = checkpoint.load_model(ckpt_b, "cpu", dtype="int8")
    _same_weights(rebuilt, fresh)
    with torch.inference_mode():
        assert not torch.allclose(rebuilt(idx), first(idx), atol=1e-3)
    # a damaged cache is rebuilt too, not an error
    cache.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _, _, meta = checkpoint.load_model(ckpt, "cpu", dtype="int8")
    assert "cached as" in meta["load_how"]


# -----------------------------------------------------------------------------
# A start from the cached copy does not hash the fp32 file (at d20 most of the load time); the copy is checked
# instead (docs/PERFORMANCE.md). "A new process" below forgets what this one has hashed already.

def _new_process():
    checkpoint._VERIFIED.clear()
    checkpoint._CACHES_VERIFIED.clear()


def _hashed_files(monkeypatch) -> list[str]:
    """Names of the files verify_checkpoint hashes from now on (the sha256 of the fp32 file)."""
    seen: list[str] = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p, *a: seen.append(p.name) or real(p, *a))
    return seen


def _flip(path, where: int, keep_mtime: bool = False):
    """Flip one byte in place; keep_mtime: as bit rot would (size and mtime as they were)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        import os
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_a_valid_cached_copy_is_loaded_without_hashing_the_fp32_file(fmt, tiny_tokenizer, tmp_path, monkeypatch):
    _, ckpt = _checkpoint(tmp_path / "run", tiny_tokenizer, 0)
    first, _, _ = checkpoint.load_model(tmp_path / "run", "cpu", dtype=fmt)   # builds the copy
    _new_process()
    hashed = _hashed_files(monkeypatch)
    again, _, meta = checkpoint.load_model(tmp_path / "run", "cpu", dtype=fmt)
    assert meta["load_how"] == f"cached {fmt} copy" and "model.safetensors" not in hashed
    _same_weights(first, again)
    # fp32 reads the fp32 file itself: that one is hashed as always
    checkpoint.load_model(tmp_path / "run", "cpu", dtype="fp32")
    assert "model.safetensors" in hashed


@pytest.mark.parametrize("cache", ["none", "damaged", "stale"])
def test_a_damaged_fp32_file_is_refused_when_no_valid_copy_vouches_for_it(cache, tiny_tokenizer, tmp_path, capsys):
    """No copy, a damaged copy, or a copy made before the fp32 file was written to (its size/mtime then): the
    fp32 file is hashed, the damage found, and nothing is converted from it or loaded."""
    _, ckpt = _checkpoint(tmp_path / "run", tiny_tokenizer, 0)
    copy = checkpoint.quantized_cache_path(ckpt, "int8")
    if cache != "none":
        checkpoint.load_model(ckpt, "cpu", dtype="int8")
        if cache == "damaged":
            _flip(copy, -1)
    _flip(ckpt / "model.safetensors", -1)   # written to: a new mtime, as a person or a bad copy leaves it
    before = copy.read_bytes() if copy.exists() else None
    _new_process()
    with pytest.raises(NanochatError, match="model.safetensors does not match its sha256"):
        checkpoint.load_model(ckpt, "cpu", dtype="int8")   # named directly
    capsys.readouterr()
    with pytest.raises(NanochatError, match="no complete checkpoint"):
        checkpoint.load_model(tmp_path / "run", "cpu", dtype="int8")   # the run dir: skipped, no older one to use
    assert "ckpt_000001 is corrupt: model.safetensors does not match its sha256" in capsys.readouterr().err
    assert (copy.read_bytes() if copy.exists() else None) == before   # nothing was built from the damaged file


def test_a_damaged_or_edited_cached_copy_is_rebuilt_never_used(tiny_tokenizer, tmp_path):
    _, ckpt = _checkpoint(tmp_path / "run", tiny_tokenizer, 0)
    good, _, _ = checkpoint.load_model(ckpt, "cpu", dtype="int8")
    copy = checkpoint.quantized_cache_path(ckpt, "int8")
    intact = copy.read_bytes()
    n = int.from_bytes(intact[:8], "little")
    header = json.loads(intact[8:8 + n])

    def swapped_offsets(text: bytes) -> bytes:
        # two same-shaped matrices trade places: every byte is still a valid int8 weight, only the wrong one
        h = json.loads(text)
        a, b = "transformer.h.0.attn.c_q.weight", "transformer.h.0.attn.c_k.weight"
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
        return json.dumps(h, separators=(",", ":")).encode()

    def edited_metadata(text: bytes) -> bytes:   # a copy claiming to be from other weights, its digest redone
        h = json.loads(text)
        h["__metadata__"]["source_sha256"] = "0" * 64
        h["__metadata__"]["sha256"] = checkpoint._self_digest(h, [intact[8 + n:]])
        return json.dumps(h, separators=(",", ":")).encode()

    def without_digest(text: bytes) -> bytes:
        h = json.loads(text)
        del h["__metadata__"]["sha256"]
        return json.dumps(h, separators=(",", ":")).encode()

    damages = {
        "a weight byte (bit rot: size and mtime kept)": lambda: _flip(copy, 8 + n + 100, keep_mtime=True),
        "a byte appended": lambda: copy.write_bytes(intact + b"\0"),
        "cut short": lambda: copy.write_bytes(intact[:-64]),
        "two tensors' offsets swapped in the header": lambda: _rewrite_header(copy, swapped_offsets),
        "its metadata edited, digest recomputed": lambda: _rewrite_header(copy, edited_metadata),
        "no digest (a copy from an older nanochat)": lambda: _rewrite_header(copy, without_digest),
    }
    for what, damage in damages.items():
        copy.write_bytes(intact)
        damage()
        assert copy.read_bytes() != intact, what
        _new_process()
        loaded, _, meta = checkpoint.load_model(ckpt, "cpu", dtype="int8")
        assert meta["load_how"] == "converted to int8, cached as model.int8.safetensors", what
        _same_weights(loaded, good)
        assert copy.read_bytes() == intact, what   # rebuilt: the same conversion, bit for bit


def _rewrite_header(path, edit):
    """Replace a safetensors header by edit(header text), padded with spaces to its old length when shorter
    (the data then stays where the offsets say)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = edit(raw[8:8 + n])
    text += b" " * max(0, n - len(text))
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def test_bit_rot_in_the_fp32_file_behind_a_valid_copy_is_found_where_the_fp32_file_is_read(tiny_tokenizer, tmp_path):
    """The limit of the size/mtime stamp, on purpose: a byte that rots without a write (mtime kept) is not seen
    by an int8 start, which reads only the copy - checked itself, made from the intact file - and never the
    damaged one. The first start that reads the fp32 file (fp32, a rebuild of the copy) hashes it and refuses."""
    _, ckpt = _checkpoint(tmp_path / "run", tiny_tokenizer, 0)
    good, _, _ = checkpoint.load_model(ckpt, "cpu", dtype="int8")
    _flip(ckpt / "model.safetensors", -1, keep_mtime=True)
    _new_process()
    loaded, _, meta = checkpoint.load_model(ckpt, "cpu", dtype="int8")
    assert meta["load_how"] == "cached int8 copy"
    _same_weights(loaded, good)
    with pytest.raises(NanochatError, match="does not match its sha256"):
        checkpoint.load_model(ckpt, "cpu", dtype="fp32")
    # the copy vouched when the checkpoint was checked and is gone when it is opened (another process removed
    # it): the fp32 file is hashed before anything is converted from it
    _new_process()
    assert checkpoint.verify_checkpoint(ckpt, weights_only=True, cached="int8") is None
    copy = checkpoint.quantized_cache_path(ckpt, "int8")
    copy.unlink()
    with pytest.raises(NanochatError, match="does not match its sha256"):
        checkpoint.load_inference_state(ckpt, checkpoint.read_meta(ckpt), "int8")
    with pytest.raises(NanochatError, match="does not match its sha256"):
        checkpoint.load_model(ckpt, "cpu", dtype="int8")
    assert not copy.exists()


def test_fp32_loading_maps_the_file_instead_of_copying_it(tiny_tokenizer, tmp_path):
    """The weights of a loaded model live in the checkpoint file's pages (a mapping), and equal what was saved."""
    model, ckpt = _checkpoint(tmp_path / "run", tiny_tokenizer, 0)
    loaded, _, meta = checkpoint.load_model(ckpt, "cpu", dtype="fp32")
    assert meta["load_how"] == "memory-mapped" and meta["load_s"] >= 0
    state, _ = checkpoint.mmap_safetensors(ckpt / "model.safetensors")
    raw = (ckpt / "model.safetensors").read_bytes()
    w = loaded.lm_head.weight
    # the tensor's bytes are the file's bytes at the header's offset: a view of the mapping, not a new buffer
    header_len = int.from_bytes(raw[:8], "little")
    begin = json.loads(raw[8:8 + header_len])["lm_head.weight"]["data_offsets"][0]
    assert bytes(w.detach().numpy().tobytes()) == raw[8 + header_len + begin:8 + header_len + begin + w.nbytes]
    assert not w.untyped_storage().resizable()   # storages torch allocates itself are resizable; a mapping is not
    for k, v in model.state_dict().items():
        if k not in ("cos", "sin"):
            assert torch.equal(state[k], v), k
    with torch.inference_mode():
        idx = torch.randint(0, 100, (1, 9))
        assert torch.equal(loaded(idx), model(idx))


def test_a_truncated_safetensors_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(NanochatError, match="cannot be read"):
        checkpoint.mmap_safetensors(path)


def test_dtype_names_and_what_auto_picks(monkeypatch):
    fast = "int4" if cpu_kernels.kernel("i4_linear") is not None else "int8"
    assert quantize.resolve_dtype("auto", "cpu") == fast
    assert quantize.resolve_dtype(None, "cpu") == fast
    monkeypatch.setattr(cpu_kernels, "_KERNEL", False)   # no C compiler: int4's fallback would be the slowest
    assert quantize.resolve_dtype("auto", "cpu") == "int8"
    assert quantize.resolve_dtype("auto", "cuda") == "bf16"
    assert quantize.resolve_dtype("auto", "mps") == "bf16"
    assert quantize.resolve_dtype("fp32", "mps") == "fp32"
    with pytest.raises(NanochatError, match="--dtype must be one of"):
        quantize.resolve_dtype("int3", "cpu")


def test_chat_autodetects_mps_on_apple_silicon(monkeypatch):
    """No Mac here: the device choice is what can be tested. CUDA first, then MPS, then the CPU."""
    from nanochat_core.common import autodetect_device_type
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert autodetect_device_type() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert autodetect_device_type() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert autodetect_device_type() == "cpu"


def test_the_engine_generates_with_an_int8_model(tiny_tokenizer, tmp_path):
    _, ckpt = _checkpoint(tmp_path / "run", tiny_tokenizer, 0)
    qmodel, tok, _ = checkpoint.load_model(ckpt, "cpu", dtype="int8")
    engine = Engine(qmodel, tok)
    prompt = [tok.get_bos_token_id()] + tok.encode("hello")
    a, _ = engine.generate_batch(prompt, 2, max_tokens=8, temperature=0.0, seed=0)
    assert a[0] == a[1] and len(a[0]) > len(prompt)


def test_a_bad_dtype_is_one_line_and_exit_nonzero(tiny_tokenizer, tmp_path):
    import os
    import subprocess
    import sys
    _, ckpt = _checkpoint(tmp_path / "run", tiny_tokenizer, 0)
    env = dict(os.environ, NANOCHAT_HOME=str(tmp_path / "home"))
    for argv in (["-m", "nanochat_cli.main", "chat", "--checkpoint", str(ckpt), "--prompt", "hi", "--dtype", "int3"],
                 ["-m", "nanochat_core.bench", "infer", "--depth", "1", "--dtype", "fp16"]):
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-800:]
        assert "--dtype must be one of" in p.stderr


def test_chat_answers_with_the_auto_format_and_says_how_it_loaded(tiny_tokenizer, tmp_path):
    """The whole `nanochat chat --prompt` path, default dtype (auto = int4 here, int8 without a C compiler),
    twice: the second start uses the cached copy."""
    import os
    import subprocess
    import sys
    _, ckpt = _checkpoint(tmp_path / "run", tiny_tokenizer, 0)
    env = dict(os.environ, NANOCHAT_HOME=str(tmp_path / "home"))
    argv = [sys.executable, "-m", "nanochat_cli.main", "chat", "--checkpoint", str(ckpt), "--prompt", "hi",
            "--max-tokens", "4", "--temperature", "0"]
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-800:]
    fmt = quantize.resolve_dtype("auto", "cpu")
    assert f"{fmt} weights, loaded in" in first.stderr and f"cached as model.{fmt}.safetensors" in first.stderr
    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and f"(cached {fmt} copy)" in second.stderr
    assert second.stdout == first.stdout
