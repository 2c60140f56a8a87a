"""Whole training steps of the quick model: MoE vs dense, balancing methods, routing statistics.

One timed unit is one optimizer step exactly as ``train/trainer.py`` runs it
(train/step.py): ``grad_accum`` micro-batches, forwarded ``train.forward_microbatches``
at a time (by default the whole step in one forward), under autocast on CUDA,
cross-entropy + auxiliary losses, backward; gradient clipping; AdamW (foreach);
zero_grad; ``after_optimizer_step`` (EB's bias update, carried statistics). The data are
random token ids of the configured vocabulary (8192) with a domain label per
sequence, generated once up front: data loading is not part of a step. The
routing recorder is on, as in training (``train.routing_stats=true``), except
in the variant that measures its cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_testbed.bench.group import Candidate, run_group, speedup_json, target_row
from moe_testbed.bench.timing import quantiles
from moe_testbed.config import Config, load_config
from moe_testbed.devices import autocast_for
from moe_testbed.errors import ConfigError
from moe_testbed.model import Transformer, count_params
from moe_testbed.model.transformer import moe_layer_indices
from moe_testbed.routing.recorder import RoutingRecorder
from moe_testbed.train.setup import build_optimizer
from moe_testbed.train.step import forward_microbatches, micro_step, optimizer_step

N_DOMAINS = 8


def default_config_path() -> Path:
    """configs/quick.yaml of this checkout (src layout), else of the working directory."""
    here = Path(__file__).resolve().parents[3] / "configs" / "quick.yaml"
    return here if here.is_file() else Path("configs/quick.yaml")


def load_step_config(path: str | Path | None, overrides: list[str]) -> Config:
    path = Path(path) if path else default_config_path()
    if not path.is_file():
        raise ConfigError(f"bench: model config {path} not found: pass --config configs/quick.yaml")
    return load_config(path, overrides)


@dataclass
class StepSetup:
    cfg: Config
    vocab: int
    grad_accum: int
    device: torch.device
    dtype: torch.dtype
    seed: int = 0

    def autocast(self):
        return autocast_for(self.device, str(self.dtype).removeprefix("torch."))()


def make_train_step(cfg: Config, setup: StepSetup, stats: bool = True):
    """(step closure, model, recorder) for one model; same seed -> same initial weights and data."""
    torch.manual_seed(setup.seed)
    dev, V = setup.device, setup.vocab
    model = Transformer(cfg, V, {"domains": [f"d{i}" for i in range(N_DOMAINS)], "vocab_size": V}).to(dev).train()
    opt = build_optimizer(model, cfg)
    n_moe = len(moe_layer_indices(cfg))
    recorder = RoutingRecorder(max(n_moe, 1), cfg.model.n_experts, N_DOMAINS, dev) if stats and n_moe else None
    B, S, A = cfg.train.micro_batch_size, cfg.data.seq_len, setup.grad_accum
    n = forward_microbatches(cfg.train.forward_microbatches, A, B * S)  # as the trainer chunks the step
    gen = torch.Generator().manual_seed(setup.seed + 1)
    tokens = torch.randint(0, V, (A * B, S + 1), generator=gen)
    dom = (torch.arange(A * B) % N_DOMAINS)[:, None].expand(A * B, S)  # single-domain sequences, as packing=domain
    forwards = [tuple(x[f * n * B : (f + 1) * n * B].to(dev) for x in (tokens[:, :-1], tokens[:, 1:], dom))
                for f in range(A // n)]  # fmt: skip
    state = {"step": 0}

    def step():
        for f, (inp, tgt, dom_BS) in enumerate(forwards):
            micro_step(model, inp, tgt, dom_BS, step=state["step"], microbatch=f * n, accum=len(forwards),
                       microbatch_size=B, whole_step=len(forwards) == 1, autocast=setup.autocast,
                       recorder=recorder)  # fmt: skip
        state["step"] += 1
        optimizer_step(model, opt, cfg.train.grad_clip, state["step"])

    return step, model, recorder


def run_step(setup: StepSetup, repeats, warmup, memory, log) -> tuple[dict, list[dict]]:
    """The quick MoE model against a dense model of equal active parameters, in tokens/s."""
    cfg = setup.cfg
    dense_cfg = cfg.replace({"model.dense": True, "model.dense_match": "active"})
    moe_step, moe_model, _ = make_train_step(cfg, setup)
    dense_step, dense_model, _ = make_train_step(dense_cfg, setup)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len * setup.grad_accum
    log(f"step: quick model, {setup.grad_accum} x {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens")
    res = run_group([Candidate("moe", moe_step, label="MoE (quick preset)"),
                     Candidate("dense", dense_step, label="dense, equal active params")],
                    "dense", repeats, warmup, setup.device, memory=memory, log=log)  # fmt: skip
    sec = {"unit": "one optimizer step", "tokens_per_step": tokens, "grad_accum": setup.grad_accum,
           "params": {"moe": count_params(moe_model), "dense": count_params(dense_model)}, **res.to_json()}  # fmt: skip
    for name in ("moe", "dense"):
        if res.ok(name):
            sec["variants"][name]["tokens_per_s"] = tokens / res.timings.summary(name)["median"]
    ratio = speedup_json(res, "moe", "dense")  # t_dense / t_moe = tokens/s of MoE over dense
    sec["ratios"] = {"moe_tokens_per_s/dense": ratio} if ratio else {}
    return sec, [target_row("step: MoE tokens/s / dense tokens/s", ratio, ">=", 0.90)]


Z_LOSS_BUDGET_PCT = 5.0  # % of step time
# The balancing terms and router options beside the methods, each alone on top of method none:
# (name, overrides, extra-step-time budget in % or None where the cost is the design, not overhead).
EXTRA_VARIANTS = (
    ("z_loss", {"balance.z_loss": 1e-3}, Z_LOSS_BUDGET_PCT),
    ("seq_aux", {"balance.seq_aux_coeff": 1e-4}, 5.0),
    ("jitter", {"routing.jitter": 0.01}, 5.0),
    # Causal Soft MoE runs every expert at every position: E / top_k times the expert FLOPs.
    ("soft_moe", {"routing.router": "soft_moe"}, None),
)


def balance_variants(cfg: Config) -> tuple[list[tuple[str, Config]], dict[str, str]]:
    """(name, config) of every registered method x scope, plus EXTRA_VARIANTS; and skipped ones with why."""
    from moe_testbed.routing.names import SCOPES
    from moe_testbed.routing.registry import BALANCERS, combination_problem, load_all

    load_all()
    base = cfg.replace({"balance.method": "none", "balance.z_loss": 0.0})
    out, skipped = [("none", base)], {}
    for method in sorted(BALANCERS):
        if method == "none":
            continue
        for scope in SCOPES:
            c = base.replace({"balance.method": method, "balance.scope": scope})
            problem = combination_problem(c)
            if problem:
                skipped[f"{method}@{scope}"] = problem
            else:
                out.append((f"{method}@{scope}", c))
    for name, overrides, _ in EXTRA_VARIANTS:
        c = base.replace(overrides)
        problem = combination_problem(c)
        if problem:
            skipped[name] = problem
        else:
            out.append((name, c))
    return out, skipped


def overhead_budget(variant: str) -> float | None:
    """The extra-step-time target of a method (its class declares it) or of an EXTRA_VARIANTS entry, in %."""
    from moe_testbed.routing.registry import BALANCERS

    extra = {name: budget for name, _, budget in EXTRA_VARIANTS}
    if variant in extra:
        return extra[variant]
    return BALANCERS[variant].overhead_budget_pct


def run_balance(setup: StepSetup, repeats, warmup, memory, log) -> tuple[dict, list[dict]]:
    variants, skipped = balance_variants(setup.cfg)
    log(f"balance: {len(variants)} variants, whole quick-model step, relative to method none")
    cands = []
    for name, c in variants:
        step, _, _ = make_train_step(c, setup)
        cands.append(Candidate(name, step, label=name))
    res = run_group(cands, "none", repeats, warmup, setup.device, memory=memory, log=log)
    sec = {"unit": "one optimizer step", "grad_accum": setup.grad_accum, **res.to_json(), "skipped": skipped,
           "overhead_pct": {}}  # fmt: skip
    targets = []
    for name, _ in variants[1:]:
        r = res.timings.ratio(name) if res.ok(name) else None
        if r is not None:
            sec["overhead_pct"][name] = {k: (v - 1) * 100 for k, v in r.items()}
        budget = overhead_budget(name.split("@")[0])
        if budget is not None:
            pct = None if r is None else {"median": (r["median"] - 1) * 100}
            targets.append(target_row(f"balance {name}: extra step time %", pct, "<=", budget))
    return sec, targets


def run_stats(setup: StepSetup, repeats, warmup, memory, log) -> tuple[dict, list[dict]]:
    """Routing statistics on vs off; plus the host read the trainer does every log_every steps."""
    cfg = setup.cfg
    on_step, model, recorder = make_train_step(cfg, setup, stats=True)
    off_step, _, _ = make_train_step(cfg, setup, stats=False)
    log("stats: quick-model step with and without the routing recorder")
    res = run_group([Candidate("stats_on", on_step, label="recorder on"),
                     Candidate("stats_off", off_step, label="recorder off")],
                    "stats_off", repeats, warmup, setup.device, memory=memory, log=log)  # fmt: skip
    sec = {"unit": "one optimizer step", "grad_accum": setup.grad_accum, **res.to_json()}
    if recorder is None or not res.ok("stats_on"):
        return sec, [target_row("stats: routing statistics % of step time", None, "<=", 3.0)]
    # The trainer copies the tables to the host and computes the scalars once per log step
    # (amortised over log_every steps of this section's length: with fewer micro-batches
    # per step than the preset this overstates its share).
    reads = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        recorder.tables().scalars(model.moe_layer_names)
        reads.append(time.perf_counter() - t0)
    read_s = quantiles(reads)["median"]
    step_s = res.timings.summary("stats_off")["median"]
    amortised = read_s / (cfg.train.log_every * step_s) * 100
    record = {k: (v - 1) * 100 for k, v in res.timings.ratio("stats_on").items()}
    sec["overhead_pct"] = {"record": record, "host_read_ms": read_s * 1e3, "host_read_amortised": amortised,
                           "log_every": cfg.train.log_every, "total": record["median"] + amortised}  # fmt: skip
    total = {"median": record["median"] + amortised}
    return sec, [target_row("stats: routing statistics % of step time", total, "<=", 3.0)]
