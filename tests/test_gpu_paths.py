"""The GPU paths a CPU can check: how often compiled flex attention compiles when callers feed new lengths,
the bounded block-mask cache, Muon's weight-decay schedule, the collectives on the floor torch (gloo, 2
processes) and base_eval's per-GPU bpb batch."""
import pytest
import torch

from nanochat_core.gpt import model as M
from nanochat_core.training import loop as training
from nanochat_core.gpt.model import GPT, config_for_depth


def _tiny(impl="flex", T=32, vocab=256):
    torch.manual_seed(0)
    cfg = config_for_depth(2, vocab, sequence_len=T, head_dim=32)
    cfg.attn_impl = impl
    with torch.device("meta"):
        m = GPT(cfg)
    m.to_empty(device="cpu")
    m.init_weights()
    return m.eval()


@pytest.fixture
def counted_flex_compiles(monkeypatch):
    """Make CPU a 'compiling' device for flex, as CUDA is, with a backend that counts graph compiles (each
    call of the backend is one dynamo compile: a first compile or a recompile for a new shape)."""
    compiles = []
    def counting_backend(gm, example_inputs):
        compiles.append([tuple(t.shape) for t in example_inputs if torch.is_tensor(t)][:1])
        return gm.forward
    torch._dynamo.reset()
    monkeypatch.setattr(M, "FLEX_COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(M, "FLEX_COMPILE_BACKEND", counting_backend)
    monkeypatch.setattr(M, "_FLEX_COMPILED", None)
    monkeypatch.setattr(M, "_FLEX_SHAPES", set())
    yield compiles
    torch._dynamo.reset()


def test_callers_with_new_lengths_do_not_recompile_flex(counted_flex_compiles):
    model, ref = _tiny("flex"), _tiny("sdpa")
    with torch.no_grad():
        # greedy_sample / CORE / chat-eval style: one new length per call, batch sizes that vary
        for T in range(3, 32):
            x = torch.randint(0, 256, (1 + T % 5, T))
            torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
        assert counted_flex_compiles == [], "a new length must not compile flex"
        # full-length rows (training / bpb eval shapes) take compiled flex, compiled once per batch size
        # (and per distinct window: each window's mask is its own graph)...
        for B in (2, 2, 4, 4, 2):
            x = torch.randint(0, 256, (B, 32))
            torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
        n_windows = len(set(model.window_sizes))
        assert len(counted_flex_compiles) == 2 * n_windows, counted_flex_compiles
        # ...but only for a few batch sizes: after FLEX_SHAPES_MAX of them the rest go to SDPA
        for B in range(5, 15):
            x = torch.randint(0, 256, (B, 32))
            torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    shapes = {c[0][0] for c in counted_flex_compiles}
    assert {2, 4} <= shapes and len(shapes) == M.FLEX_SHAPES_MAX, shapes
    assert len(counted_flex_compiles) == M.FLEX_SHAPES_MAX * n_windows


def test_block_mask_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(M, "_BLOCK_MASKS", M.OrderedDict())
    for T in range(8, 8 + 3 * M.BLOCK_MASK_CACHE_MAX):
        masks = M.flex_block_masks(T, [None, 16], torch.device("cpu"))
        assert set(masks) == {None, 16}
    assert len(M._BLOCK_MASKS) <= M.BLOCK_MASK_CACHE_MAX
    # the most recent shape is still cached (reused, not rebuilt)
    again = M.flex_block_masks(T, [None], torch.device("cpu"))
    assert again[None] is masks[None]


def test_muon_weight_decay_decays_to_zero_over_the_run():
    model = _tiny("sdpa")
    opt = model.setup_optimizer(weight_decay=0.2)
    training.remember_initial_lr(opt)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    total = 10
    seen = []
    for step in range(total):
        training.apply_schedule(opt, training.lr_multiplier(step, total, 1), training.muon_momentum(step),
                                training.muon_weight_decay_multiplier(step / total))
        seen.append(muon[0]["weight_decay"])
    assert seen[0] == pytest.approx(0.2) and seen[-1] == pytest.approx(0.02)
    assert all(a > b for a, b in zip(seen, seen[1:]))
    # integrated decay is half the constant schedule's (what the reference's 0.28 was tuned for)
    assert sum(seen) == pytest.approx(0.2 * total * 0.55)
    training.apply_schedule(opt, 0.0, None, training.muon_weight_decay_multiplier(1.0))
    assert all(g["weight_decay"] == 0.0 for g in muon)
    # AdamW groups keep their own small, constant weight decay (the schedule only moves Muon's)
    assert [g["weight_decay"] for g in opt.param_groups if g["kind"] == "adamw"] == [0.01, 0.001, 0.01, 0.05, 0.0, 0.0]


def test_time_horizon_progress_reaches_the_end_when_steps_slow_down():
    """On an injected clock (a busy machine must not change the outcome): steps of 10 ms, then 6x slower."""
    now = [1000.0]
    h = training.TimeHorizon(budget_s=1.5, clock=lambda: now[0])
    mults, times, step = [], [], 0
    while not h.done():
        mults.append(training.lr_multiplier_at(h.progress(), step, warmup_steps=3))
        times.append(0.01 if step < 10 else 0.06)    # throughput drops 6x after step 10
        now[0] += times[-1]
        step += 1
        h.note_step(times[-1])
    slowest = max(times[-3:])
    assert now[0] <= h.end                                      # it never started a step it could not finish
    # the last step started within two (slowest) steps of the end (one more would not have fitted): at the
    # bottom of the warmdown
    assert h.end - now[0] < slowest and mults[-1] <= 2 * slowest / h.span / training.WARMDOWN_RATIO + 0.01, mults
    assert max(mults) == 1.0 and mults[-1] < 0.25, mults


# -----------------------------------------------------------------------------
# Multi-GPU Muon on a torch without reduce_scatter_single / all_gather_single (torch 2.11, the GPU image's):
# the long-standing collectives give the very same update, under real gloo with 2 processes.

def _collectives_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import torch.distributed as dist
    from nanochat_core.gpt import muon
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for legacy in (True, False):
            muon.USE_LEGACY_COLLECTIVES = legacy
            model = _tiny("sdpa", vocab=512)    # wte 512 x 128: big enough to be row-sharded (AdamW path)
            model.train()
            opt = model.setup_optimizer(weight_decay=0.1)
            g = torch.Generator().manual_seed(7)
            for _ in range(2):
                x = torch.randint(0, 512, (4, 33), generator=g)[rank * 2:(rank + 1) * 2]
                model(x[:, :-1], x[:, 1:]).backward()
                opt.step()
                model.zero_grad(set_to_none=True)
            torch.save(model.state_dict(), f"{tmp}/legacy{int(legacy)}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow   # ~10 s idle: two processes start torch
def test_multi_rank_muon_on_the_long_standing_collectives_matches_the_new_ones(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collectives_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    load = lambda legacy, rank: torch.load(tmp_path / f"legacy{legacy}_rank{rank}.pt")
    old, new, old1 = load(1, 0), load(0, 0), load(1, 1)
    init = _tiny("sdpa", vocab=512).state_dict()
    for k in new:
        assert torch.equal(old[k], new[k]) and torch.equal(old[k], old1[k]), k
    assert any(not torch.equal(new[k], init[k]) for k in new)   # the steps did move the weights


def test_base_eval_bpb_batch_follows_the_per_gpu_presets():
    from nanochat_core.stages.base_eval import bpb_device_batch
    from nanochat_core.training.loop import preset_device_batch
    # a 24 GB card at d20 gets the preset's 4 rows of 2048 (it used to get 32 on any GPU)
    assert bpb_device_batch(20, 2048, "cuda", 24.0) == 4
    assert bpb_device_batch(26, 2048, "cuda", 80.0) == 16 and bpb_device_batch(12, 1024, "cuda", 141.0) == 128
    for depth, T, dev, gb in [(20, 2048, "cuda", 40.0), (4, 256, "cpu", None), (32, 2048, "cuda", 8.0)]:
        assert bpb_device_batch(depth, T, dev, gb) == preset_device_batch(depth, T, dev, gb)


# -----------------------------------------------------------------------------
# Speed flags: correctness on CPU (their speed needs a GPU)

def test_bf16_residual_stream_stays_bf16_under_autocast_and_matches_fp32():
    model = _tiny("sdpa")
    model.train()
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.transformer.h[1].register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = model(x[:, :-1], x[:, 1:])
        model.residual_bf16 = True
        fast = model(x[:, :-1], x[:, 1:])
    hook.remove()
    assert seen[0] == (torch.float32, torch.float32)            # default: the stream is fp32 under autocast
    assert seen[1] == (torch.bfloat16, torch.bfloat16)          # the flag: bf16 in and out of every block
    fast.backward()
    assert fast.dtype == torch.float32 and abs(fast.item() - base.item()) < 0.02 * base.item()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert model.resid_lambdas.grad is not None and torch.isfinite(model.resid_lambdas.grad).all()
    model.residual_bf16 = True                                  # without autocast the flag changes nothing
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :-1]), _tiny("sdpa")(x[:, :-1]), rtol=0, atol=0)


def test_compiled_muon_step_matches_eager_and_compiles_once_per_shape(monkeypatch):
    from nanochat_core.gpt import muon
    compiles = []
    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward
    monkeypatch.setattr(muon, "MUON_COMPILE_BACKEND", counting_backend)
    torch._dynamo.reset()
    results, opts = [], []
    for compiled in (False, True):
        model = _tiny("sdpa")
        model.train()
        opt = model.setup_optimizer(weight_decay=0.1, compile_muon=compiled)
        training.remember_initial_lr(opt)
        g = torch.Generator().manual_seed(5)
        states = []
        for step in range(4):   # lr, momentum and weight decay change every step
            training.apply_schedule(opt, 1 - step / 4, training.muon_momentum(step), 1 - step / 4)
            x = torch.randint(0, 256, (2, 33), generator=g)
            model(x[:, :-1], x[:, 1:]).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        results.append(states)
        opts.append(opt)
    torch._dynamo.reset()
    # after the first step (same gradients in both): the Muon matrices agree to float rounding - scalar vs
    # 0-dim-tensor kernels differ in the last bits. (Later steps drift apart chaotically through AdamW's
    # eps 1e-10 on noise-level gradients, as any two summation orders do; see tests/test_muon.py.)
    muon_names = {n for grp in opts[0].param_groups if grp["kind"] == "muon" for n in grp["names"]}
    init = _tiny("sdpa").state_dict()
    for k in muon_names:
        eager, comp = results[0][0][k], results[1][0][k]
        assert (comp - eager).norm() <= 1e-4 * (eager - init[k]).norm() + 1e-9, k   # measured ~1e-5
    n_shapes = sum(1 for grp in opts[1].param_groups if grp["kind"] == "muon")
    assert 1 <= len(compiles) <= n_shapes, (len(compiles), n_shapes)   # no recompile as the schedules move


def test_freeze_gc_moves_live_objects_out_of_the_collectors_sight():
    import gc
    gc.unfreeze()
    try:
        training.freeze_gc()
        assert gc.get_freeze_count() > 1000 and gc.isenabled()
    finally:
        gc.unfreeze()
