"""MuonAdamW: Polar Express orthogonality, the update maths, determinism, and the distributed path on
real torch.distributed (gloo, 2 processes): 2 ranks == 1 rank with the same global batch, and optimizer
shards that move between world sizes (1 -> 2 and 2 -> 1)."""
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat_core.common import NanochatError
from nanochat_core.gpt.model import GPT, config_for_depth
from nanochat_core.gpt.muon import MuonAdamW, polar_express

GLOBAL_B, T, STEPS = 4, 32, 3


# -----------------------------------------------------------------------------
# Polar Express

@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 96), (200, 50)])
def test_polar_express_output_is_orthogonal(shape):
    """Stated bound: for Gaussian matrices with aspect ratio >= 2 (smallest singular value not tiny),
    5 steps put every singular value of the output in [0.8, 1.2] (measured: ~0.86 .. 1.14) and the Gram
    matrix of the short side within 0.5 of the identity in spectral norm."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    X = polar_express(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.8 and sv.max() < 1.2, (sv.min().item(), sv.max().item())
    gram = X @ X.mT if shape[0] <= shape[1] else X.mT @ X
    assert torch.linalg.matrix_norm(gram - torch.eye(gram.size(0)), ord=2) < 0.5
    # it is the polar factor's direction: same left/right singular vectors as G (X ~ U V^T)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.linalg.matrix_norm(X - U @ Vh) / math.sqrt(min(shape)) < 0.2
    # the input's scale does not matter
    torch.testing.assert_close(polar_express(1000 * G), X, rtol=1e-4, atol=1e-4)


def test_polar_express_batched_equals_per_matrix_and_rejects_bad_input():
    G = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(0))
    batched = polar_express(G)
    for i in range(3):
        torch.testing.assert_close(batched[i], polar_express(G[i]), rtol=1e-5, atol=1e-6)
    with pytest.raises(NanochatError):
        polar_express(G, steps=6)
    with pytest.raises(NanochatError):
        polar_express(torch.randn(5))


# -----------------------------------------------------------------------------
# the update maths, single process

def test_muon_step_size_and_cautious_weight_decay():
    """One Muon step on a tall 64x16 matrix: |dW|_F = lr * sqrt(64/16) * |u|_F with |u|_F ~ sqrt(16)
    (an orthogonalised update keeps the norm of its polar factor through NorMuon). Weight decay only
    touches entries where update and weight agree in sign: W_wd - W_nowd = -lr_eff * wd * W * [u*W >= 0]."""
    g = torch.Generator().manual_seed(0)
    W0, grad = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    lr, wd = 0.01, 0.5
    lr_eff = lr * math.sqrt(64 / 16)
    results = []
    for decay in (0.0, wd):
        W = torch.nn.Parameter(W0.clone())
        W.grad = grad.clone()
        MuonAdamW([dict(kind="muon", params=[W], lr=lr, weight_decay=decay)]).step()
        results.append(W.detach())
    u = (W0 - results[0]) / lr_eff
    assert 0.8 < u.norm().item() / math.sqrt(16) < 1.2, u.norm().item()
    mask = (u * W0) >= 0
    assert 0.2 < mask.float().mean() < 0.8            # both branches exercised
    torch.testing.assert_close(results[0] - results[1], lr_eff * wd * W0 * mask, rtol=1e-4, atol=1e-6)


def test_adamw_groups_match_torch_adamw():
    g = torch.Generator().manual_seed(1)
    init = torch.randn(10, 6, generator=g)
    grads = [torch.randn(10, 6, generator=g) for _ in range(5)]
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_a = MuonAdamW([dict(kind="adamw", params=[ours], lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)])
    opt_b = torch.optim.AdamW([theirs], lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for gr in grads:
        ours.grad, theirs.grad = gr.clone(), gr.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    assert opt_a.param_groups[0]["initial_lr"] == 0.05


def test_bad_groups_are_user_errors():
    with pytest.raises(NanochatError):
        MuonAdamW([dict(kind="sgd", params=[torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)])
    with pytest.raises(NanochatError):  # muon needs one matrix shape per group
        MuonAdamW([dict(kind="muon", params=[torch.nn.Parameter(torch.zeros(2, 2)),
                                             torch.nn.Parameter(torch.zeros(2, 3))], lr=0.1)])


# -----------------------------------------------------------------------------
# a tiny GPT trained by 1 and by 2 processes

def _model() -> GPT:
    torch.manual_seed(0)
    # 3 layers, not 2: backout subtracts a share of the stream after layer n_layer // 2, which in a 2-layer model
    # is the last one - a pure rescaling that the final RMSNorm undoes, so its gradient would be rounding noise
    cfg = config_for_depth(3, 512, sequence_len=T, head_dim=32)     # width 192: wte 512x192 is ZeRO-sharded
    model = GPT.build(cfg, "cpu")
    # Zero output projections make the network exactly invariant to the residual scalars at step 0, so
    # their gradients are pure rounding noise (~1e-10) that Adam (eps 1e-10) would turn into full steps and
    # any two summation orders would disagree on. Small random projections give every parameter a real gradient.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.02)
            block.mlp.c_proj.weight.normal_(0.0, 0.02)
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 512, (GLOBAL_B, T + 1), generator=g) for _ in range(STEPS)]


def _train(model, opt, batches, rank=0, world=1):
    local = GLOBAL_B // world
    for batch in batches:
        x = batch[rank * local:(rank + 1) * local]
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        model.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # A: the whole run on 2 ranks, each on its half of every global batch
        model = _model()
        opt = model.setup_optimizer(weight_decay=0.1)
        _train(model, opt, _batches(), rank, world)
        torch.save(model.state_dict(), f"{tmp}/A_params{rank}.pt")
        torch.save(opt.state_dict_shard(), f"{tmp}/A_shard{rank}.pt")
        # B: resume from the 1-rank run's state after STEPS-1 steps, take the last step on 2 ranks
        model = _model()
        model.load_state_dict(torch.load(f"{tmp}/ref_params_before_last.pt"))
        opt = model.setup_optimizer(weight_decay=0.1)
        opt.load_state_dict_shards([torch.load(f"{tmp}/ref_shard_before_last.pt")])
        _train(model, opt, _batches()[-1:], rank, world)
        torch.save(model.state_dict(), f"{tmp}/B_params{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("muon_dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # module-scoped: runs before the per-test _one_torch_thread fixture (conftest)
    model = _model()
    opt = model.setup_optimizer(weight_decay=0.1)
    batches = _batches()
    _train(model, opt, batches[:-1])
    torch.save(model.state_dict(), tmp / "ref_params_before_last.pt")
    torch.save(opt.state_dict_shard(), tmp / "ref_shard_before_last.pt")
    _train(model, opt, batches[-1:])
    mp.spawn(_worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True)
    torch.set_num_threads(threads)
    load = lambda name: torch.load(tmp / name)
    return dict(ref=model.state_dict(), ref_opt=opt.state_dict_shard(),
                A=[load(f"A_params{r}.pt") for r in range(2)], A_shards=[load(f"A_shard{r}.pt") for r in range(2)],
                B=[load(f"B_params{r}.pt") for r in range(2)])


def _assert_same_updates(got: dict, want: dict, rel_tol: float) -> None:
    """Per tensor, the total update got - init differs from want - init by < rel_tol in relative Frobenius
    norm. Not elementwise: summation order differs between 1 and 2 ranks, and where a gradient entry is ~0
    Adam (eps 1e-10) turns that rounding noise into a sizeable step, and a cautious weight-decay mask
    can flip; such entries are few, so they barely move the norm (measured worst: ~5e-4 over 3 steps)."""
    init = _model().state_dict()
    assert got.keys() == want.keys()
    for k in want:
        rel = ((got[k] - want[k]).norm() / (want[k] - init[k]).norm()).item()
        assert rel < rel_tol, (k, rel)


def test_two_rank_gloo_run_matches_one_rank(runs):
    # the replicas stay bitwise identical (every rank writes the same gathered weights)...
    for k in runs["A"][0]:
        assert torch.equal(runs["A"][0][k], runs["A"][1][k]), k
    # ...and equal the 1-process run with the same global batch up to fp summation order
    _assert_same_updates(runs["A"][0], runs["ref"], rel_tol=2e-3)
    # the run actually moved the weights (c_proj starts at zero)
    assert runs["ref"]["transformer.h.0.mlp.c_proj.weight"].abs().max() > 1e-3


def test_two_rank_shards_are_partial_and_load_into_one_rank(runs):
    s0, s1 = (s["params"] for s in runs["A_shards"])
    # ZeRO-2: each Muon matrix's state lives on exactly one rank; the big AdamW tables are split by rows
    muon_names = [n for n in runs["ref_opt"]["params"] if "transformer.h." in n]
    assert all((n in s0) != (n in s1) for n in muon_names)
    wte = "transformer.wte.weight"
    assert (s0[wte]["start"], s0[wte]["end"], s1[wte]["start"], s1[wte]["end"]) == (0, 256, 256, 512)
    # 2 -> 1: merge both shards into a one-process optimizer; state equals the 1-process run's
    model = _model()
    model.load_state_dict(runs["A"][0])
    opt = model.setup_optimizer(weight_decay=0.1)
    opt.load_state_dict_shards(runs["A_shards"])
    assert opt.steps_taken == STEPS
    merged = opt.state_dict_shard()["params"]
    assert merged.keys() == runs["ref_opt"]["params"].keys()
    for name, rec in runs["ref_opt"]["params"].items():
        for k, v in rec["state"].items():
            if torch.is_tensor(v):
                torch.testing.assert_close(merged[name]["state"][k], v, rtol=1e-4, atol=1e-5)
            else:
                assert merged[name]["state"][k] == v
    # a missing shard is an error, not silently fresh state
    opt2 = model.setup_optimizer()
    with pytest.raises(NanochatError):
        opt2.load_state_dict_shards(runs["A_shards"][:1])


def test_one_rank_shard_resumed_on_two_ranks_gives_the_same_next_update(runs):
    for k in runs["B"][0]:
        assert torch.equal(runs["B"][0][k], runs["B"][1][k]), k
    # resuming re-uses the exact state, so only the last step's summation order differs (measured ~3e-6 before
    # MuonEq, 1.7e-5 with it: rescaling every row to the mean row norm also scales up a quiet row's rounding)
    _assert_same_updates(runs["B"][0], runs["ref"], rel_tol=1e-4)


def test_updates_are_bitwise_deterministic_on_cpu(runs):
    model = _model()
    opt = model.setup_optimizer(weight_decay=0.1)
    _train(model, opt, _batches())
    for k, v in model.state_dict().items():
        assert torch.equal(v, runs["ref"][k]), k
