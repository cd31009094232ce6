"""
Dollars -> a run. Given an offer ($/h for a node with N GPUs of one type) and a budget, pick the largest
model depth whose compute-optimal training, plus the fixed work around it (setup, tokenizer, midtraining,
SFT, evals), fits inside the budget - and say what it will cost, how long each stage takes and what the
anchor (Karpathy's nanochat) scored at that size.

Pure arithmetic: no torch, no sky. Every number that is an estimate says where it came from, so that the
benchmark issue can replace estimates with measurements row by row.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from nanochat_core.common import NanochatError
from nanochat_core.gpt.model_config import check_depth, config_for_depth, count_params, flops_per_token as model_flops
from nanochat_core.run_spec import deadline_hours, job_price, spend_cap
from nanochat_core.node.datasheet import peak_bf16

VOCAB = 32768          # the cloud preset's tokenizer (2^15, as the reference)
SEQ_LEN = 2048
TOKENS_PER_PARAM = 10  # nanochat trains ~8-12 tokens per scaling param (Chinchilla: 20); we take the middle
DEPTHS = list(range(4, 34, 2))  # the planner's search space; d4 is the smallest model worth training

# Model FLOPs utilisation assumed per GPU family. H100 = 0.50 is the anchor's measured figure
# (nanochat: ~50% bf16 MFU on 8xH100, ~800K tok/s at d24); the others are ESTIMATES (older or
# smaller cards reach lower MFU with the same kernels). Small models are penalised below.
MFU = {"H100": 0.50, "H200": 0.52, "B200": 0.45, "A100": 0.45, "A100-80GB": 0.45,
       "L40S": 0.35, "L4": 0.30, "A10G": 0.30, "A10": 0.30}

# Anchor's CORE per depth: what the reference reported (source in the string) - to set expectations. Only
# points whose model is the one we train at that depth are quoted: the anchor's launch-era d20 report card
# (CORE 0.2219) was a different model (561M params, ~11B tokens) from our d20 (897M params, 4.35B tokens),
# so it is not a promise we can make. No interpolation across depths we have no comparable point for.
EXPECTED_CORE = {
    24: (0.2565, "nanochat time-to-GPT-2 leaderboard, d24 reaches GPT-2's CORE"),
    26: (0.26, "nanochat leaderboard d26 (+FP8), ~GPT-2 grade"),
}
# Training tokens per data shard of the default source (climbmix: ~250M characters per shard at ~4
# characters per token with our 32768-token vocab; 170 shards ~ 10.6B tokens). An estimate: the node downloads
# 10% more than the plan needs so that data never silently repeats.
TOKENS_PER_SHARD = 62e6
MIN_SHARDS = 8  # the tokenizer trains on the first 8 shards


def expected_core(depth: int) -> tuple[float, str] | None:
    """The anchor's CORE at this depth: reported, or linearly interpolated between reported depths."""
    if depth in EXPECTED_CORE:
        return EXPECTED_CORE[depth]
    known = sorted(EXPECTED_CORE)
    for lo, hi in zip(known, known[1:]):
        if lo < depth < hi:
            (a, _), (b, _) = EXPECTED_CORE[lo], EXPECTED_CORE[hi]
            return a + (b - a) * (depth - lo) / (hi - lo), f"interpolated between the anchor's d{lo} and d{hi}"
    return None


# What a chat model of this depth can do, in plain words, for the plan: a rough guide from the anchor's published
# runs and samples at these sizes (its d20 "kindergartener", its d24-d26 GPT-2-grade CORE), not a measurement of
# this plan. The smallest depth each line applies from.
CAPABILITY = [
    (4, "a toy: English-looking words and phrases, no real conversation; it shows the pipeline works end to end"),
    (10, "grammatical but rambling English in chat form; it rarely stays on topic and knows few facts"),
    (16, "simple chat in fluent English, short stories and poems, easy everyday questions; it often invents "
         "facts, and arithmetic and code are beyond it"),
    (24, "about GPT-2 grade (2019): fluent chat, short essays, easy factual questions right more often than not; "
         "it still invents facts confidently and manages simple arithmetic or code only sometimes"),
]


def capability(depth: int) -> str:
    """The plain-words line for a depth (CAPABILITY's last row at or below it)."""
    return [text for d, text in CAPABILITY if depth >= d or d == CAPABILITY[0][0]][-1]


def model_config(depth: int):
    """The exact model the node will train at this depth (cloud preset: vocab 32768, seq 2048)."""
    return config_for_depth(depth, VOCAB, sequence_len=SEQ_LEN)


def scaling_params(depth: int) -> int:
    """Transformer matrices + lm_head: what tokens = ratio x params counts (nanochat's definition)."""
    return count_params(model_config(depth))["scaling"]


def total_params(depth: int) -> int:
    """All parameters, incl. token and value embeddings: the same count as the built model's numel."""
    return count_params(model_config(depth))["total"]


def flops_per_token(depth: int) -> float:
    """The model's own FLOPs/token: 6 x scaling params + attention, with the sliding windows it uses."""
    return model_flops(model_config(depth))


def canonical_gpu(name: str) -> str:
    """'H100-SXM', 'h100:8', 'H100-PCIe' -> 'H100' (the throughput table's key)."""
    n = name.upper().replace("NVIDIA-", "").split(":")[0]
    for suffix in ("-SXM5", "-SXM4", "-SXM", "-PCIE", "-MEGA"):
        n = n.replace(suffix, "")
    return n


def throughput(gpu: str, depth: int) -> tuple[float, str]:
    """(tokens/s per GPU, how it was derived). Unknown GPU -> a clear error, not a silent guess."""
    key = canonical_gpu(gpu)
    if key not in MFU:
        raise NanochatError(f"no throughput estimate for GPU '{gpu}'; known: {', '.join(sorted(MFU))}")
    # Small models cannot keep tensor cores busy: scale MFU down linearly below d16 (estimate).
    mfu = MFU[key] * min(1.0, 0.4 + 0.6 * depth / 16)
    peak = peak_bf16(key)
    tps = mfu * peak / flops_per_token(depth)
    return tps, f"estimate: {mfu:.0%} MFU x {peak / 1e12:.0f} TFLOP/s peak / FLOPs per token"


# The table the benchmark issue refines: tokens/s per GPU for each GPU type and depth. Rows are
# estimates today (each row carries its derivation); a measured row replaces the estimate.
THROUGHPUT_TABLE: dict[tuple[str, int], tuple[float, str]] = {
    (g, d): throughput(g, d) for g in MFU for d in DEPTHS
}
# The anchor's published point, recorded as such: 8xH100, d24, ~800K tok/s => 100K tok/s per GPU.
THROUGHPUT_TABLE[("H100", 24)] = (100_000.0, "anchor: nanochat d24 on 8xH100 ~800K tok/s (README)")


# Fixed overheads in hours, per node (estimates; the anchor's speedrun: ~8 min mid, ~7 min SFT, ~20 min evals).
SETUP_H = 0.10      # provisioning + cached setup (target: first step < 3 min) + data head start
TOKENIZER_H = 0.05  # tokenizer training overlaps the data download
EVAL_H = 0.25       # CORE + chat evals + report
SAVE_H = 0.03       # final checkpoint save and upload
# The node's `preflight` stage (nanochat_core/training/preflight.py, the first stage of the cloud pipeline): one process
# on one GPU builds the planned model, compiles it and runs 3 warm-up + 5 timed training steps at the run's
# device batch, then the bf16-vs-fp32, attention, decode, CORE-batch and checkpoint checks. Its docstring says
# "about a minute"; docs/PERFORMANCE.md estimates 8 minutes on one H100 for the full matrix at two depths (four
# train configurations each, two compiled), i.e. ~2 minutes per compiled configuration with its share of the
# other checks - and `--matrix train` runs one. We take 3 minutes: that, plus importing torch and measuring
# the device's matmul peak, with compile time at d26-d32 (larger than the d24 of that estimate) unmeasured.
# An ESTIMATE (no GPU timing of it yet); a measured PREFLIGHT PASS line ("..., N s") replaces it.
PREFLIGHT_H = 3 / 60
# Kept free at the end of the budget, after the job's own deadline: the node kills what is left of the job
# (up to ~90 s), autodown waits one idle minute (jobs only, never for ssh sessions) and the cloud tears the
# node down (a few minutes). Every plan keeps this margin on top of its hours, at the highest price the
# launch may fail over to, so the hard cap holds whichever offer SkyPilot ends up launching.
MARGIN_H = 10 / 60
# Minutes of idle time (jobs only: an open ssh session does not keep the node up) after which a cluster
# running a budgeted job tears itself down: well inside MARGIN_H.
AUTOSTOP_MIN = 1
# The node's own bound on setup (sky/train.yaml, backends/skypilot.setup_guard): SkyPilot sets autostop only
# after setup succeeds, so until then a node whose launcher went quiet (a laptop asleep, a hung install) would
# bill on. Setup's first step sets an autostop of this many idle minutes (no job yet counts as idle), or fewer
# when the budget's deadline is nearer. 30: five times the planned SETUP_H, far beyond a slow first install.
SETUP_GUARD_MIN = 30
# Time base training's deadline keeps free after its planned end, for a setup slower than planned (the CUDA
# torch install, a slow image, a busy catalog): at least as long again as SETUP_H, so a setup twice as slow
# still leaves base its planned tokens. Without it the smallest budgets had 2 minutes to spare and a setup
# 4 minutes slow cut base short after most of the money was spent. The planner prefers a depth that keeps
# it; where no depth can, the plan says so (setup_note).
SLOW_SETUP_H = SETUP_H
# A spot run is a SkyPilot managed job, which costs what an on-demand run does not; each is in its plan:
# - Recoveries. A preemption, and a restart after the job failed (job_recovery's max_restarts_on_errors:
#   SPOT_RESTARTS_ON_ERRORS), each provision a new node and set it up again: SETUP_H each. The plan reserves
#   SPOT_RECOVERIES of them before base training's deadline (its "recovery" stage), so one preemption and one
#   restart still leave base its planned tokens; any more are paid from the same cap and cut training short.
#   One restart, not SkyPilot's example of 3: a deterministic failure fails again, and each try bills a setup.
# - A recovery that starts just before the job's deadline provisions a node past it (its setup then installs
#   nothing and the job ends at once: sky/train.yaml), so a spot plan's margin holds one SETUP_H more.
# - The jobs controller: a VM SkyPilot keeps up while the job runs (4+ vCPUs, 4 GiB per vCPU, 50 GB disk;
#   SkyPilot 0.14's jobs/constants.py) and stops after 10 idle minutes (inside the margin). Its $/h, from the
#   catalog (backends/skypilot.controller_price), is part of the whole job's price, so the cap and deadlines count it.
#   Its stopped disk still bills (cents a day) until `sky down` removes the controller.
SPOT_RESTARTS_ON_ERRORS = 1
SPOT_RECOVERIES = 1 + SPOT_RESTARTS_ON_ERRORS


@dataclass
class Stage:
    name: str
    hours: float
    cost: float


@dataclass
class Plan:
    offer: dict
    price_per_hour: float   # for the whole job (all nodes, and a spot run's jobs controller)
    budget: float
    depth: int
    params: int
    tokens: int
    hours: float
    cost: float
    stages: list[Stage] = field(default_factory=list)
    tokens_per_sec: float = 0.0
    throughput_source: str = ""
    expected_core: float | None = None
    expected_core_source: str = ""
    nodes: int = 1
    gpus: int = 8
    num_shards: int = MIN_SHARDS  # training shards the node downloads: enough for `tokens`, never repeating
    # Why this plan spends less than its budget by design ("" when it may spend all of it): it trains the
    # largest depth, or runs preflight only. Then its own cost plus the margin is its hard cap (spend_cap), so
    # a run that goes wrong cannot spend the rest of a budget the plan never meant to use; capped_note says so.
    capped_by: str = ""
    capped_note: str = ""
    setup_note: str = ""   # set when base's deadline keeps less than SLOW_SETUP_H after its planned end
    # The money path's single source of truth, all counted in hours after launch. max_price_per_hour is the
    # highest price (whole job) among the offers the launch may fail over to; spend_cap is the most the plan
    # may spend (the budget, or less when capped_by); the job must end by deadline_hours (spend_cap / max
    # price, less the margin) and base training by base_deadline_hours (that, less the planned post-base
    # stages). The node enforces exactly these two moments.
    max_price_per_hour: float = 0.0
    spend_cap: float = 0.0
    deadline_hours: float = 0.0
    base_deadline_hours: float = 0.0
    margin_hours: float = MARGIN_H
    controller_per_hour: float = 0.0   # a spot run's jobs controller (inside price_per_hour)

    def to_json(self) -> dict:
        d = asdict(self)
        d["hours"] = round(self.hours, 3)
        d["cost"] = round(self.cost, 2)
        # Rounded down: the node must never stop later than the plan allowed.
        for k in ("deadline_hours", "base_deadline_hours"):
            d[k] = math.floor(d[k] * 1000) / 1000
        for s in d["stages"]:
            s["hours"] = round(s["hours"], 3)
            s["cost"] = round(s["cost"], 2)
        return d

    def post_base_hours(self) -> float:
        """Time the trainer must leave free after base training (what the deadline reserves)."""
        return sum(s.hours for s in self.stages if s.name in ("mid", "sft", "eval"))

    def pre_base_end_hours(self) -> float:
        """When base training is planned to end, in hours after launch (setup + preflight + tok + base)."""
        return sum(s.hours for s in self.stages if s.name in ("setup", "recovery", "preflight", "tok", "base"))

    def set_max_price(self, max_price: float) -> None:
        """Derive the hard cap and the node's deadlines from the highest price the launch may end up paying."""
        self.max_price_per_hour = max(max_price, self.price_per_hour)
        # Whole dollars, rounded up when capped: a cap a person can read, never below the plan plus its margin.
        self.spend_cap = spend_cap(self.budget, 0.0, self.min_budget(slack=self.has_base())
                                   if self.capped_by else None)
        if self.capped_by:
            self.capped_note = (f"{self.capped_by}: at most ${self.spend_cap:.2f} is spent (its own cost plus the "
                                f"teardown margin, at up to ${self.max_price_per_hour:.2f}/h), not the "
                                f"${self.budget:.2f} budget; the node stops it there")
        self.deadline_hours = deadline_hours(self.spend_cap, self.max_price_per_hour, self.margin_hours)
        self.base_deadline_hours = self.deadline_hours - self.post_base_hours()
        spare = self.base_deadline_hours - self.pre_base_end_hours()
        self.setup_note = ""
        if any(s.name == "base" for s in self.stages) and spare < SLOW_SETUP_H - 1e-6:
            self.setup_note = (f"base training's deadline leaves only {max(0.0, spare) * 60:.0f} min after its "
                               f"planned end: a setup that much slower than the {SETUP_H * 60:.0f} min planned "
                               f"cuts base short; --budget {self.min_budget(slack=True)} leaves "
                               f"{SLOW_SETUP_H * 60:.0f} min")

    def preflight_only(self) -> None:
        """`--preflight-only`: the node sets up and runs the preflight checks at this plan's depth, nothing
        else. The plan counts just those, and its own cost (plus the margin) becomes its hard cap: a preflight
        that hangs must not spend the budget the training run was planned with."""
        self.stages = [s for s in self.stages if s.name in ("setup", "recovery", "preflight")]
        self.hours = sum(s.hours for s in self.stages)
        self.cost = self.hours * self.price_per_hour
        self.capped_by = f"--preflight-only runs setup and the d{self.depth} preflight checks alone"
        self.set_max_price(self.max_price_per_hour)

    def has_base(self) -> bool:
        return any(s.name == "base" for s in self.stages)

    def fits(self, price: float | None = None, slack: bool = False) -> bool:
        """The whole run plus the margin (and with slack=True, SLOW_SETUP_H for a slow setup) stays within
        the budget at `price` (default: this offer's)."""
        extra = SLOW_SETUP_H if slack else 0.0
        return (price or self.price_per_hour) * (self.hours + self.margin_hours + extra) <= self.budget + 1e-9

    def min_budget(self, slack: bool = False) -> int:
        """The smallest whole-dollar budget this plan fits in (plus the margin, and with slack=True the time
        for a slow setup), at its max price."""
        extra = SLOW_SETUP_H if slack else 0.0
        return math.ceil(self.max_price_per_hour * (self.hours + self.margin_hours + extra) + 1e-6)


def plan_for_depth(offer: dict, depth: int, budget: float, nodes: int = 1, setup_extra_h: float = 0.0,
                   controller_per_hour: float = 0.0) -> Plan:
    """setup_extra_h: more setup time, e.g. uploading the user's own data (flows.YourData), billed like setup.
    controller_per_hour: a spot run's jobs controller (see SPOT_RECOVERIES); a spot offer also reserves its
    recoveries."""
    gpu = offer["accelerators"].split(":")[0]
    ngpu = int(offer["accelerators"].split(":")[1]) if ":" in offer["accelerators"] else 1
    spot = bool(offer.get("spot"))
    price = job_price(offer["price_per_hour"], nodes, controller_per_hour if spot else 0.0)
    tps_gpu, source = THROUGHPUT_TABLE.get((canonical_gpu(gpu), depth)) or throughput(gpu, depth)
    # Multi-node pays an interconnect tax; 0.9 per extra node is an estimate (no measurement yet).
    tps = tps_gpu * ngpu * nodes * (0.9 if nodes > 1 else 1.0)
    scaling = scaling_params(depth)
    tokens = TOKENS_PER_PARAM * scaling
    base_h = tokens / tps / 3600
    # Stage names are the pipeline's (preflight, tok, base, mid, sft, eval), in its order, so the meter can
    # match events to them; "setup" is provisioning + environment, "eval" includes the final save and the report.
    # "recovery" (spot only) is time reserved, not a stage the node runs: right after setup, so the meter stops
    # counting it once the pipeline starts.
    hours = {"setup": SETUP_H + setup_extra_h, **({"recovery": SPOT_RECOVERIES * SETUP_H} if spot else {}),
             "preflight": PREFLIGHT_H, "tok": TOKENIZER_H, "base": base_h,
             "mid": max(0.05, 0.05 * base_h), "sft": max(0.05, 0.04 * base_h), "eval": EVAL_H + SAVE_H}
    stages = [Stage(n, h, h * price) for n, h in hours.items()]
    total_h = sum(hours.values())
    core = expected_core(depth)
    plan = Plan(offer=offer, price_per_hour=price, budget=budget, depth=depth, params=total_params(depth),
                tokens=int(tokens), hours=total_h, cost=total_h * price, stages=stages, tokens_per_sec=tps,
                throughput_source=source, expected_core=core[0] if core else None,
                expected_core_source=core[1] if core else "no comparable anchor result at this depth",
                nodes=nodes, gpus=ngpu, margin_hours=MARGIN_H + (SETUP_H if spot else 0.0),
                controller_per_hour=controller_per_hour if spot else 0.0)
    plan.num_shards = max(MIN_SHARDS, math.ceil(tokens * 1.1 / TOKENS_PER_SHARD))
    plan.set_max_price(price)
    return plan


def make_plan(offer: dict, budget: float, depth: int | None = None, nodes: int = 1,
              setup_extra_h: float = 0.0, controller_per_hour: float = 0.0) -> Plan:
    """The largest depth whose whole run, plus the teardown margin, costs <= budget (or exactly `depth`,
    which must also fit). A plan that fits gives base training its planned tokens by construction: its
    base deadline is at or after the planned end of base. Failover offers are limited afterwards
    (`limit_failover`) to those at which this plan still fits."""
    if not (budget > 0) or math.isinf(budget):
        raise NanochatError(f"budget must be a positive number of dollars, got {budget}")
    def at(d: int) -> Plan:
        return plan_for_depth(offer, d, budget, nodes, setup_extra_h, controller_per_hour)

    if depth is not None:
        check_depth(depth)
        p = at(depth)
        if not p.fits():
            fit = [d for d in DEPTHS if at(d).fits()]
            hint = f"use --depth {fit[-1]} or less" if fit else "choose a cheaper offer"
            raise NanochatError(f"depth {depth} needs about ${p.cost:.2f} on this offer plus "
                                f"${p.margin_hours * p.price_per_hour:.2f} of teardown margin, more than the "
                                f"${budget:.2f} budget: use --budget {p.min_budget()} or {hint}")
        return p
    best = roomy = None
    for d in DEPTHS:
        p = at(d)
        if p.fits():
            best = p
        if p.fits(slack=True):
            roomy = p     # the largest depth that also survives a slow setup: preferred
    best = roomy or best
    if best is None:
        smallest = at(DEPTHS[0])
        raise NanochatError(f"a ${budget:.2f} budget is too small: the smallest model (depth {DEPTHS[0]}) needs "
                            f"about ${smallest.cost:.2f} plus ${smallest.margin_hours * smallest.price_per_hour:.2f} "
                            f"of teardown margin on {offer.get('cloud', '?')} at ${smallest.price_per_hour:.2f}/h; "
                            f"use --budget {smallest.min_budget()} or more (or `nanochat train --local` for $0)")
    if best.depth == DEPTHS[-1]:
        best.capped_by = f"depth {DEPTHS[-1]} is the largest model the planner trains"
        best.set_max_price(best.max_price_per_hour)
    return best


def limit_failover(plan: Plan, candidates: list[dict]) -> list[dict]:
    """The offers SkyPilot may fail over to, limited to those at which the whole plan (with its margin)
    stays within the budget; sets the plan's max price (and so its hard cap and deadlines) from them. The
    plan's own offer always stays first."""
    # A plan that keeps room for a slow setup at its own price keeps it at every offer it may land on.
    roomy = plan.fits(slack=True) and plan.has_base()
    def whole(offer: dict) -> float:   # the whole job's $/h at that offer
        return job_price(offer["price_per_hour"], plan.nodes, plan.controller_per_hour)

    keep = [c for c in candidates if plan.fits(whole(c), slack=roomy)] or [plan.offer]
    if plan.offer not in keep:
        keep = [plan.offer] + keep
    plan.set_max_price(max(whole(c) for c in keep))
    return keep


def parse_budget(text: str) -> float:
    """'100', '$100', '99.5' -> float; anything else -> NanochatError (one line, no traceback)."""
    try:
        value = float(str(text).strip().lstrip("$").replace(",", ""))
    except ValueError:
        raise NanochatError(f"--budget must be a number of US dollars like 100, got '{text}'"
                            f"{_shell_dollar_hint(text)}") from None
    if not (value > 0) or math.isinf(value):
        raise NanochatError(f"--budget must be a positive number of US dollars, got '{text}'{_shell_dollar_hint(text)}")
    return value


def _shell_dollar_hint(text: str) -> str:
    """An unquoted `--budget $100` reaches us as '00': the shell expanded `$1` (an empty positional parameter)
    before we saw it. What is left then is empty or only zeros."""
    t = str(text).strip()
    if t.strip("0.") == "":
        return ("; if you typed --budget $100, the shell replaced '$1' with nothing: "
                "write --budget 100, or quote it: --budget '$100'")
    return ""
