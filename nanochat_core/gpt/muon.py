"""
MuonAdamW: one optimizer object for the whole GPT.

- Muon for the 2-D matrices inside the transformer blocks. Per step, for each matrix:
    1. Nesterov momentum:  m = lerp(m, g, 1 - mu);  u = lerp(g, m, mu)
    2. MuonEq: rows rescaled to the mean row norm (better conditioned input for step 3)
    3. Polar Express: u <- approximately the orthogonal polar factor of u (all singular values -> ~1),
       5 iterations of an odd matrix polynomial with per-step coefficients (arXiv:2505.16932); then Muon+:
       the Frobenius norm is set to sqrt(min(rows, cols)), an exactly semi-orthogonal matrix's, which undoes
       the iteration's under-convergence in the overall scale
    4. NorMuon variance reduction: an EMA of the per-row (or per-column, whichever side is longer)
       mean square of u rescales rows to equal RMS, then the whole update is rescaled back to the norm it
       had after step 3 (so step 3's scale is kept, only the distribution across rows changes)
    5. cautious weight decay: decay only the entries where the update and the weight agree in sign
    6. p -= lr * sqrt(max(1, rows/cols)) * u   (tall matrices get proportionally larger steps)
- AdamW (bias-corrected, decoupled weight decay, eps 1e-10) for embeddings, lm_head and scalars.

Groups carry kind ("muon" | "adamw"), names (parallel to params; checkpoints key optimizer state by
name), lr and initial_lr (schedules set lr = initial_lr * multiplier), and for Muon momentum / beta2 /
weight_decay / ns_steps.

Distributed (torch.distributed initialised, world_size > 1), NO DDP: the optimizer owns gradient
synchronisation; the training loop only calls backward() and step(). Gradients are averaged over ranks.
- Muon: each group's same-shaped matrices are stacked; a reduce-scatter hands every rank the averaged
  gradients of its contiguous chunk of matrices; the rank updates only those (and keeps momentum state
  only for those: ZeRO-2 style); an all-gather brings every rank the new weights.
- AdamW: large tensors whose first dim divides by world_size are reduce-scattered along dim 0, updated
  as slices and all-gathered; small ones are all-reduced and updated redundantly on every rank.
All reductions are launched asynchronously up front and consumed in order, so communication of later
groups overlaps with the maths of earlier ones; the all-gathers likewise overlap the remaining updates.
The two collectives go through _reduce_scatter / _all_gather below: torch's newest names
(reduce_scatter_single / all_gather_single, added in 2026 - torch 2.11 lacks them) when present, else the
long-standing reduce_scatter_tensor / all_gather_into_tensor (torch >= 1.13; NCCL and gloo). Gloo (CPU)
runs the same path in the tests, both variants.

Checkpointing: state_dict_shard() is this rank's state keyed by parameter name with the dim-0 range it
covers; load_state_dict_shards(shards) accepts the shards of ANY old world size and rebuilds this rank's
part. On CPU the update is deterministic (bitwise) for the same inputs and world size.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from nanochat_core.common import NanochatError

# Polar Express coefficients (a, b, c) per iteration, X <- a X + b (X X^T) X + c (X X^T)^2 X, for 5
# iterations with a 2% safety margin on the input's scale, as published
# for the paper's Muon setting and used by modded-nanogpt / nanochat.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ADAMW_SHARD_MIN_NUMEL = 1 << 16   # below this an AdamW tensor is simply all-reduced (not worth slicing)


def equilibrate_rows(u: torch.Tensor) -> torch.Tensor:
    """MuonEq: every row of u (..., rows, cols) rescaled to the mean row norm, so the matrix entering the
    orthogonalisation is better conditioned (one loud row no longer dominates its spectrum)."""
    target = u.norm(dim=(-2, -1), keepdim=True) / u.size(-2) ** 0.5
    return u * (target / u.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def polar_express(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonal polar factor of G (..., rows, cols): same shape, singular values pushed
    towards 1. bf16 on CUDA (tensor cores; the iteration is robust to it), fp32 elsewhere (bf16 matmuls
    on CPUs are very slow). Returns the compute dtype; callers cast."""
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise NanochatError(f"polar_express supports 1..{len(POLAR_EXPRESS_COEFFS)} steps, got {steps}")
    if G.ndim < 2:
        raise NanochatError(f"polar_express needs a matrix (or a stack of them), got shape {tuple(G.shape)}")
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:                      # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm, so after this every singular value is <= 1/1.01 (the published
    # coefficients assume a 2% margin; the reference now uses 1%, and Muon+ in muon_math corrects the scale)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + eps)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def normuon_rescale(u: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon: u (n, rows, cols) fp32; second_moment (n, rows, 1) or (n, 1, cols), updated in place.
    Each row (cols for wide matrices) is divided by the RMS its EMA says it has; the result is scaled to
    keep the Frobenius norm u had, so only the spread across rows/cols changes."""
    red_dim = -1 if u.size(-2) >= u.size(-1) else -2
    n_red = u.size(red_dim)
    mean_sq = u.square().mean(dim=red_dim, keepdim=True)
    norm_before = (mean_sq.sum(dim=(-2, -1), keepdim=True) * n_red).sqrt()
    second_moment.lerp_(mean_sq, 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = ((mean_sq * n_red) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return u * (step_size * (norm_before / norm_after.clamp_min(1e-10)))


# None = pick by what this torch has; tests force True to run the old-torch path on a new torch
USE_LEGACY_COLLECTIVES: bool | None = None


def _legacy() -> bool:
    if USE_LEGACY_COLLECTIVES is not None:
        return USE_LEGACY_COLLECTIVES
    return not hasattr(dist, "reduce_scatter_single")


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, async_op: bool = True):
    """Sum inp (world x out's rows) over ranks; this rank gets its contiguous slice in out."""
    if _legacy():
        return dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.SUM, async_op=async_op)
    return dist.reduce_scatter_single(out, inp, op=dist.ReduceOp.SUM, async_op=async_op)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, async_op: bool = True):
    """Every rank's inp, concatenated along dim 0 in rank order, into out."""
    if _legacy():
        return dist.all_gather_into_tensor(out, inp, async_op=async_op)
    return dist.all_gather_single(out, inp, async_op=async_op)


def muon_math(grads, mom, v, w, mu, beta2, lr, wd, ns_steps: int):
    """Steps 1-6 of the docstring for a stack of same-shaped matrices (n, rows, cols), all fp32. Updates
    the momentum `mom` and NorMuon's second moment `v` in place and returns the new weights. A function of
    tensors alone, so that MuonAdamW(compile_step=True) can hand it to torch.compile whole."""
    mom.lerp_(grads, 1 - mu)
    u = grads.lerp(mom, mu)                                                  # Nesterov
    u = equilibrate_rows(u)
    u = polar_express(u, ns_steps).float()
    u = u * (min(u.size(-2), u.size(-1)) ** 0.5 / u.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))  # Muon+
    u = normuon_rescale(u, v, beta2)
    cautious = (u * w) >= 0                                                  # same sign -> decay
    return w - (lr * u + (lr * wd) * w * cautious)


MUON_COMPILE_BACKEND = "inductor"   # tests swap in a cheap backend that counts compiles


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MuonAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict], compile_step: bool = False):
        for g in param_groups:
            if g.get("kind") not in ("muon", "adamw"):
                raise NanochatError(f"optimizer group kind must be 'muon' or 'adamw', got {g.get('kind')!r}")
            g["params"] = list(g["params"])
            g.setdefault("names", [f"{g['kind']}.{i}" for i in range(len(g["params"]))])
            if len(g["names"]) != len(g["params"]):
                raise NanochatError("optimizer group 'names' must be parallel to 'params'")
            g.setdefault("initial_lr", g["lr"])
            if g["kind"] == "muon":
                shapes = {tuple(p.shape) for p in g["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise NanochatError(f"a muon group needs 2-D params of one shape, got {sorted(shapes)}")
                g.setdefault("momentum", 0.95)
                g.setdefault("beta2", 0.95)
                g.setdefault("weight_decay", 0.0)
                g.setdefault("initial_weight_decay", g["weight_decay"])   # schedules decay it towards 0
                g.setdefault("ns_steps", 5)
            else:
                g.setdefault("betas", (0.8, 0.95))
                g.setdefault("eps", 1e-10)
                g.setdefault("weight_decay", 0.0)
        super().__init__(param_groups, {})
        # compile_step: Muon's maths (Polar Express's 15 matmuls, NorMuon, the update) as one compiled graph
        # per matrix shape instead of ~40 eager kernels each; the reference compiles its step the same way
        self._compiled_math = (torch.compile(muon_math, dynamic=False, backend=MUON_COMPILE_BACKEND)
                               if compile_step else None)
        self.steps_taken = 0   # optimizer steps so far (saved in the shards; per-param AdamW steps live in state)

    # -- layout: which part of which parameter this rank updates -----------------
    @staticmethod
    def _muon_chunk(n_params: int, rank: int, world: int) -> tuple[int, int, int]:
        """Matrices [lo, hi) of the stack are this rank's; every rank's chunk is `per` long (padded)."""
        per = -(-n_params // world)
        lo = min(rank * per, n_params)
        return lo, min(lo + per, n_params), per

    @staticmethod
    def _adamw_sharded(p: torch.Tensor, world: int) -> bool:
        return world > 1 and p.ndim >= 1 and p.size(0) % world == 0 and p.numel() >= ADAMW_SHARD_MIN_NUMEL

    def _owned_ranges(self, rank: int, world: int) -> dict[str, tuple[torch.Tensor, dict, int, int]]:
        """name -> (param, group, start, end): the dim-0 range of each param whose state this rank holds."""
        out = {}
        for g in self.param_groups:
            if g["kind"] == "muon":
                lo, hi, _ = self._muon_chunk(len(g["params"]), rank, world)
                for i in range(lo, hi):
                    p = g["params"][i]
                    out[g["names"][i]] = (p, g, 0, p.size(0))
            else:
                for name, p in zip(g["names"], g["params"]):
                    if self._adamw_sharded(p, world):
                        rows = p.size(0) // world
                        out[name] = (p, g, rank * rows, (rank + 1) * rows)
                    else:
                        out[name] = (p, g, 0, p.size(0) if p.ndim else 1)
        return out

    # -- the step -----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NanochatError("MuonAdamW does not take a closure")
        rank, world = _world()
        # phase 1: launch every gradient reduction (async), in group order
        launched = [self._launch_muon_reduce(g, rank, world) if g["kind"] == "muon"
                    else self._launch_adamw_reduce(g, world) for g in self.param_groups]
        # phase 2: consume them in order: update this rank's part, launch the all-gathers (async)
        gathers = [self._muon_update(g, job, rank, world) if g["kind"] == "muon"
                   else self._adamw_update(g, job, rank, world) for g, job in zip(self.param_groups, launched)]
        # phase 3: wait for the new weights and write them into the parameters
        for finish in gathers:
            for fn in finish:
                fn()
        self.steps_taken += 1

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor:
        # a parameter that took no part in the loss still has to join the collectives
        return p.grad if p.grad is not None else torch.zeros_like(p)

    def _launch_muon_reduce(self, g: dict, rank: int, world: int):
        params = g["params"]
        stacked = torch.stack([self._grad(p).float() for p in params])          # (K, rows, cols)
        if world == 1:
            return stacked, None
        _, _, per = self._muon_chunk(len(params), rank, world)
        if per * world > len(params):                                            # pad to equal chunks
            pad = stacked.new_zeros((per * world - len(params), *stacked.shape[1:]))
            stacked = torch.cat([stacked, pad])
        mine = stacked.new_empty((per, *stacked.shape[1:]))
        return mine, _reduce_scatter(mine, stacked)

    def _launch_adamw_reduce(self, g: dict, world: int):
        jobs = []
        for p in g["params"]:
            grad = self._grad(p).float()
            if world == 1:
                jobs.append((grad, None))
            elif self._adamw_sharded(p, world):
                mine = grad.new_empty((p.size(0) // world, *p.shape[1:]))
                jobs.append((mine, _reduce_scatter(mine, grad.contiguous())))
            else:
                grad = grad.clone()   # all-reduce in place on our own copy, never on p.grad
                jobs.append((grad, dist.all_reduce(grad, op=dist.ReduceOp.SUM, async_op=True)))
        return jobs

    def _muon_update(self, g: dict, job, rank: int, world: int):
        grads, work = job
        if work is not None:
            work.wait()
            grads.div_(world)
        params = g["params"]
        lo, hi, per = self._muon_chunk(len(params), rank, world)
        own = params[lo:hi]
        rows, cols = params[0].shape
        if own:
            grads_own = grads[:hi - lo]
            for p in own:
                st = self.state[p]
                if not st:
                    st["momentum_buffer"] = torch.zeros(rows, cols, dtype=torch.float32, device=p.device)
                    st["second_momentum_buffer"] = torch.zeros(
                        (rows, 1) if rows >= cols else (1, cols), dtype=torch.float32, device=p.device)
            mom = torch.stack([self.state[p]["momentum_buffer"] for p in own])
            v = torch.stack([self.state[p]["second_momentum_buffer"] for p in own])
            w = torch.stack([p.detach().float() for p in own])
            lr = g["lr"] * math.sqrt(max(1.0, rows / cols))
            hyper = (g["momentum"], g["beta2"], lr, g["weight_decay"])
            if self._compiled_math is not None:
                # 0-dim tensors, not floats: the schedules change lr / momentum / wd every step, and a
                # compiled function specialises on Python floats (a recompile per step)
                hyper = tuple(torch.tensor(h, dtype=torch.float32, device=w.device) for h in hyper)
                w = self._compiled_math(grads_own, mom, v, w, *hyper, g["ns_steps"])
            else:
                w = muon_math(grads_own, mom, v, w, *hyper, g["ns_steps"])
            for i, p in enumerate(own):
                self.state[p]["momentum_buffer"].copy_(mom[i])
                self.state[p]["second_momentum_buffer"].copy_(v[i])
        else:
            w = grads.new_zeros((0, rows, cols))
        if world == 1:
            for i, p in enumerate(own):
                p.copy_(w[i])
            return []
        if w.size(0) < per:                                                          # pad (rank owns < per)
            w = torch.cat([w, w.new_zeros((per - w.size(0), rows, cols))])
        gathered = w.new_empty((per * world, rows, cols))
        work = _all_gather(gathered, w.contiguous())
        def write_back():
            work.wait()
            for i, p in enumerate(params):
                p.copy_(gathered[i])
        return [write_back]

    def _adamw_update(self, g: dict, jobs, rank: int, world: int):
        b1, b2 = g["betas"]
        lr, eps, wd = g["lr"], g["eps"], g["weight_decay"]
        finish = []
        for p, (grad, work) in zip(g["params"], jobs):
            if work is not None:
                work.wait()
                grad.div_(world)
            sharded = self._adamw_sharded(p, world)
            rows = p.size(0) // world if sharded else 0
            view = p.detach()[rank * rows:(rank + 1) * rows] if sharded else p.detach()
            w = view if view.dtype == torch.float32 else view.float()   # fp32 masters: update in place
            st = self.state[p]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(w)
                st["exp_avg_sq"] = torch.zeros_like(w)
            st["step"] += 1
            w.mul_(1 - lr * wd)
            st["exp_avg"].lerp_(grad, 1 - b1)
            st["exp_avg_sq"].lerp_(grad.square(), 1 - b2)
            bias1, bias2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
            denom = (st["exp_avg_sq"] / bias2).sqrt_().add_(eps)
            w.addcdiv_(st["exp_avg"], denom, value=-lr / bias1)
            if w is not view:
                view.copy_(w)
            if sharded:   # everyone's updated rows, gathered straight into the parameter
                finish.append(_all_gather(p.detach(), view.clone()).wait)
        return finish

    # -- checkpoints ----------------------------------------------------------------
    def state_dict_shard(self) -> dict:
        """This rank's optimizer state: {name: {"start", "end", "rows", "state": {...}}} where [start, end)
        is the range along dim 0 of the parameter that the state tensors cover, plus the world layout."""
        rank, world = _world()
        params = {}
        for name, (p, g, start, end) in self._owned_ranges(rank, world).items():
            st = self.state.get(p)
            if not st:
                continue  # never stepped
            params[name] = {"start": start, "end": end, "rows": p.size(0) if p.ndim else 1,
                            "state": {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}}
        return {"format": 1, "rank": rank, "world_size": world, "steps_taken": self.steps_taken, "params": params}

    def load_state_dict_shards(self, shards: list[dict]) -> None:
        """Rebuild this rank's state from the shards of all ranks of an earlier run (any world size)."""
        if not shards:
            raise NanochatError("no optimizer shards to load")
        pieces: dict[str, list[dict]] = {}
        for shard in shards:
            if shard.get("format") != 1:
                raise NanochatError(f"unknown optimizer shard format {shard.get('format')!r}")
            for name, rec in shard["params"].items():
                pieces.setdefault(name, []).append(rec)
        rank, world = _world()
        self.steps_taken = max(int(shard.get("steps_taken", 0)) for shard in shards)
        self.state.clear()
        for name, (p, g, start, end) in self._owned_ranges(rank, world).items():
            if name not in pieces:
                continue  # the old run never stepped it: start fresh, as it would have
            full = self._merge(name, pieces[name])
            st = {}
            for k, v in full.items():
                if torch.is_tensor(v) and g["kind"] == "adamw" and v.ndim >= 1 and (start, end) != (0, v.size(0)):
                    v = v[start:end]
                st[k] = v.clone().to(p.device) if torch.is_tensor(v) else v
            self.state[p] = st

    @staticmethod
    def _merge(name: str, recs: list[dict]) -> dict:
        """Stitch the dim-0 ranges of one parameter's state back into whole tensors. Replicated state
        (every rank holds all of it) appears once per rank: later duplicates are skipped."""
        recs = sorted(recs, key=lambda r: (r["start"], r["end"]))
        rows = recs[0]["rows"]
        covered, parts = 0, []
        for r in recs:
            if r["end"] <= covered:
                continue
            if r["start"] != covered:
                raise NanochatError(f"optimizer shards for {name} do not line up (gap or overlap at row {covered})")
            parts.append(r["state"])
            covered = r["end"]
        if covered != rows:
            raise NanochatError(f"optimizer shards for {name} cover {covered} of {rows} rows: a shard is missing")
        if len(parts) == 1:   # the common case (one old rank held it all): no copy
            return dict(parts[0])
        return {k: torch.cat([pt[k] for pt in parts]) if torch.is_tensor(v) else v for k, v in parts[0].items()}
