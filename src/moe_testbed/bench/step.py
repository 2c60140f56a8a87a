"""Whole training steps of the quick model: MoE vs dense, balancing methods, routing statistics.

One timed unit is one optimizer step exactly as ``train/trainer.py`` runs it:
``grad_accum`` micro-batches of forward (under autocast on CUDA), cross-entropy
+ auxiliary losses, backward; gradient clipping; AdamW (foreach); zero_grad;
``after_optimizer_step`` (EB's bias update, LBL's global buffers). The data are
random token ids of the configured vocabulary (8192) with a domain label per
sequence, generated once up front: data loading is not part of a step. The
routing recorder is on, as in training (``train.routing_stats=true``), except
in the variant that measures its cost.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_testbed.bench.group import Candidate, run_group, speedup_json, target_row
from moe_testbed.bench.timing import quantiles
from moe_testbed.config import Config, ConfigError, load_config
from moe_testbed.model import Transformer, count_params
from moe_testbed.model.transformer import moe_layer_indices
from moe_testbed.routing.base import RoutingContext
from moe_testbed.routing.stats import RoutingRecorder

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
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW as trainer.build_optimizer builds it: matrices decay, vectors do not, foreach."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)


def make_train_step(cfg: Config, setup: StepSetup, stats: bool = True):
    """(step closure, model, recorder) for one model; same seed -> same initial weights and data."""
    torch.manual_seed(setup.seed)
    dev, V = setup.device, setup.vocab
    model = Transformer(cfg, V, {"domains": [f"d{i}" for i in range(N_DOMAINS)], "vocab_size": V}).to(dev).train()
    opt = _optimizer(model, cfg)
    n_moe = len(moe_layer_indices(cfg))
    recorder = RoutingRecorder(max(n_moe, 1), cfg.model.n_experts, N_DOMAINS, dev) if stats and n_moe else None
    B, S, A = cfg.train.micro_batch_size, cfg.data.seq_len, setup.grad_accum
    gen = torch.Generator().manual_seed(setup.seed + 1)
    batches = []
    for mb in range(A):
        tokens = torch.randint(0, V, (B, S + 1), generator=gen)
        dom = (torch.arange(B) + mb * B) % N_DOMAINS  # single-domain sequences, as data.packing=domain
        batches.append((tokens[:, :-1].to(dev), tokens[:, 1:].to(dev), dom[:, None].expand(B, S).reshape(-1).to(dev)))
    state = {"step": 0}

    def step():
        for mb, (inp, tgt, dom) in enumerate(batches):
            ctx = RoutingContext(
                training=True, seq_len=S, domain_ids_T=dom, step=state["step"], microbatch=mb,
                tokens_in_step=inp.numel() * A, recorder=recorder, capacity_factor=cfg.balance.capacity_factor,
            )  # fmt: skip
            with setup.autocast():
                out = model(inp, ctx)
            ce = F.cross_entropy(out.logits.float().view(-1, V), tgt.reshape(-1))
            ((ce + out.aux_loss) / A).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        model.after_optimizer_step(state["step"])

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
    return sec, [target_row("step: MoE tokens/s / dense tokens/s", ratio, ">=", 0.85)]


BALANCE_LIMITS = {"lbl": 5.0, "eb": 5.0, "z_loss": 5.0, "sh": 15.0, "ba": 30.0}  # % of step time


def balance_variants(cfg: Config) -> tuple[list[tuple[str, Config]], dict[str, str]]:
    """(name, config) of every registered method x scope, plus z-loss; and skipped combinations with why."""
    from moe_testbed.routing.registry import BALANCERS, combination_problem, load_all

    load_all()
    base = cfg.replace({"balance.method": "none", "balance.z_loss": 0.0})
    out, skipped = [("none", base)], {}
    for method in sorted(BALANCERS):
        if method == "none":
            continue
        for scope in ("sequence", "microbatch", "global"):
            c = base.replace({"balance.method": method, "balance.scope": scope})
            problem = combination_problem(c)
            if problem:
                skipped[f"{method}@{scope}"] = problem
            else:
                out.append((f"{method}@{scope}", c))
    out.append(("z_loss", base.replace({"balance.z_loss": 1e-3})))
    return out, skipped


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
        method = name.split("@")[0]
        if method in BALANCE_LIMITS:
            pct = None if r is None else {"median": (r["median"] - 1) * 100}
            targets.append(target_row(f"balance {name}: extra step time %", pct, "<=", BALANCE_LIMITS[method]))
    return sec, targets


def run_stats(setup: StepSetup, repeats, warmup, memory, log) -> tuple[dict, list[dict]]:
    """Routing statistics on vs off; plus the host read the trainer does every log_every steps."""
    from moe_testbed.analysis.metrics import routing_scalars

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
        t = {k: v.numpy() for k, v in recorder.tables().items()}
        routing_scalars(t["counts"], model.moe_layer_names, drops_LD=t["drops"],
                        gate_mass_sum_LD=t["gate_mass_sum"], tokens_LD=t["tokens"])  # fmt: skip
        reads.append(time.perf_counter() - t0)
    read_s = quantiles(reads)["median"]
    step_s = res.timings.summary("stats_off")["median"]
    amortised = read_s / (cfg.train.log_every * step_s) * 100
    record = {k: (v - 1) * 100 for k, v in res.timings.ratio("stats_on").items()}
    sec["overhead_pct"] = {"record": record, "host_read_ms": read_s * 1e3, "host_read_amortised": amortised,
                           "log_every": cfg.train.log_every, "total": record["median"] + amortised}  # fmt: skip
    total = {"median": record["median"] + amortised}
    return sec, [target_row("stats: routing statistics % of step time", total, "<=", 3.0)]
