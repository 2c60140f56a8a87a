"""The MoE layer against the dense floor and against Hugging Face's Mixtral block.

One timed unit is forward + backward of one FFN layer over T tokens, with a
fixed random output gradient: ``y = layer(x); y.backward(g)``, gradients reset
to None before each call (as ``zero_grad(set_to_none=True)`` does in training).

Variants (same tokens, same arithmetic):
  dense       the floor: the project's SwiGLU with hidden size top_k x expert_hidden
  moe         our MoELayer: softmax top-k router + sort-by-expert dispatch + experts + combine
  hf_<impl>   transformers' MixtralSparseMoeBlock with our weights, experts backend <impl>

The MoE variants share one set of weights and one float64 reference (see guard.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_testbed.bench.group import Candidate, GroupResult, ratio_json, run_group, speedup_json, target_row
from moe_testbed.bench.guard import check, reference_grads, reference_moe, untie_routing
from moe_testbed.bench.hf import HF_BACKENDS, build_hf_block, hf_available, hf_grads
from moe_testbed.config import load_config
from moe_testbed.devices import autocast_for
from moe_testbed.model.ffn import SwiGLU
from moe_testbed.model.moe import MoELayer
from moe_testbed.routing.context import RoutingContext


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_model: int
    expert_hidden: int
    n_experts: int
    top_k: int
    tokens: int
    max_vs_dense: float | None = None  # target: moe / dense <= this
    min_vs_hf: float = 1.0  # target: t(best HF backend) / t(moe) >= this


LAYER_SHAPES = (
    LayerShape("A", 256, 512, 8, 2, 8192, max_vs_dense=1.10),
    LayerShape("B", 256, 256, 16, 4, 8192, max_vs_dense=1.25),
    LayerShape("C", 512, 256, 64, 8, 4096, max_vs_dense=1.35, min_vs_hf=1.15),
    LayerShape("D", 128, 256, 8, 2, 2048, max_vs_dense=1.25),
    LayerShape("quick", 128, 256, 24, 2, 512),  # configs/quick.yaml: micro-batch 2 x seq 256
)


def reference_swiglu(x: Tensor, w13_weight: Tensor, w2_weight: Tensor) -> Tensor:
    a, b = F.linear(x, w13_weight).chunk(2, dim=-1)
    return F.linear(F.silu(a) * b, w2_weight)


def build_candidates(shape: LayerShape, device: torch.device, dtype: torch.dtype, tol: float, seed: int = 0):
    """The variants of one shape, each with its guard."""
    s = shape
    gen = torch.Generator().manual_seed(seed)
    T, D, H, E, K = s.tokens, s.d_model, s.expert_hidden, s.n_experts, s.top_k
    router = torch.randn(E, D, generator=gen) * D**-0.5
    w13 = torch.randn(E, D, 2 * H, generator=gen) * 0.02
    w2 = torch.randn(E, H, D, generator=gen) * (0.02 / 2**0.5)
    x = untie_routing(torch.randn(T, D, generator=gen), router, K)
    g = torch.randn(T, D, generator=gen)
    want_moe = reference_grads(
        lambda x_, r_, a_, b_: reference_moe(x_, r_, a_, b_, K), x, g, {"router": router, "w13": w13, "w2": w2}
    )
    x, g = x.to(device).requires_grad_(True), g.to(device)
    autocast = autocast_for(device, str(dtype).removeprefix("torch."))
    cands: list[Candidate] = []

    def add(name, label, module, forward, grads_of, want):
        params = list(module.parameters())

        def run() -> Tensor:  # the timed unit: forward + backward with fresh gradients
            x.grad = None
            for p in params:
                p.grad = None
            with autocast():
                y = forward(x)
            y.backward(g.view_as(y))
            return y

        def run_guard() -> dict:
            y = run()
            return {"out": y.detach().reshape(T, D), "grad_x": x.grad, **grads_of()}

        cands.append(Candidate(name, run, guard=lambda: check(run_guard, want, tol), label=label))

    # The floor: a dense SwiGLU doing the same arithmetic, against its own float64 copy.
    dense = SwiGLU(D, K * H)
    with torch.no_grad():
        dense.w13.weight.copy_(torch.randn(2 * K * H, D, generator=gen) * 0.02)
        dense.w2.weight.copy_(torch.randn(D, K * H, generator=gen) * 0.02)
    want_dense = reference_grads(
        reference_swiglu, x.detach().cpu(), g.cpu(), {"w13": dense.w13.weight, "w2": dense.w2.weight}
    )
    dense = dense.to(device)
    add("dense", f"dense SwiGLU h={K * H}", dense, dense,
        lambda: {"grad_w13": dense.w13.weight.grad, "grad_w2": dense.w2.weight.grad}, want_dense)  # fmt: skip

    cfg = load_config(None, [
        f"model.d_model={D}", f"model.expert_hidden={H}", f"model.n_experts={E}", f"routing.top_k={K}",
        "model.n_heads=1", "balance.method=none", "routing.router=softmax_topk", "routing.renormalize=true",
    ])  # fmt: skip
    moe = MoELayer(cfg, 0, 0, {})
    with torch.no_grad():
        moe.router.weight.copy_(router)
        moe.experts.w13.copy_(w13)
        moe.experts.w2.copy_(w2)
    moe = moe.to(device)
    ctx = RoutingContext(training=True, seq_len=T)
    impl = "grouped_mm" if moe.experts.use_grouped_mm(x) else "loop"
    add("moe", f"moe-testbed ({impl})", moe, lambda x_: moe(x_.view(1, T, D), ctx),
        lambda: {"grad_router": moe.router.weight.grad, "grad_w13": moe.experts.w13.grad,
                 "grad_w2": moe.experts.w2.grad}, want_moe)  # fmt: skip

    if hf_available() is None:
        for backend in HF_BACKENDS:
            blk = build_hf_block(D, H, E, K, backend, router, w13, w2).to(device)
            add(f"hf_{backend}", f"HF Mixtral ({backend})", blk, lambda x_, b_=blk: b_(x_.view(1, T, D)),
                lambda b_=blk: hf_grads(b_), want_moe)  # fmt: skip
    return cands


def run_layer(
    shapes, device, dtype, tol, repeats, warmup, min_sample_s, memory, log, budget_s: float = 0.0
) -> tuple[dict, list[dict]]:
    """Time every shape (fast shapes get more repeats, up to ``budget_s`` each); returns (section, targets)."""
    section: dict = {"unit": "forward + backward of one FFN layer", "shapes": []}
    targets: list[dict] = []
    if (why := hf_available()) is not None:
        section["hf_missing"] = why
        log(f"  {why}: HF baselines skipped")
    for s in shapes:
        log(f"layer {s.name}: d={s.d_model} H={s.expert_hidden} E={s.n_experts} k={s.top_k} T={s.tokens}")
        res = run_group(build_candidates(s, device, dtype, tol), "dense", repeats, warmup, device,
                        min_sample_s, memory, log, budget_s=budget_s)  # fmt: skip
        hf_names = [n for n in (f"hf_{b}" for b in HF_BACKENDS) if res.ok(n)]
        row = {"name": s.name, "shape": {"d_model": s.d_model, "expert_hidden": s.expert_hidden,
               "n_experts": s.n_experts, "top_k": s.top_k, "tokens": s.tokens}, **res.to_json()}  # fmt: skip
        ratios = {f"{n}/dense": ratio_json(res, n, "dense") for n in ("moe", *hf_names)}
        if hf_names and res.ok("moe"):
            best = min(hf_names, key=lambda n: res.timings.summary(n)["median"])
            ratios["hf_best/moe"] = {**speedup_json(res, "moe", best), "versus": best}
        row["ratios"] = {k: v for k, v in ratios.items() if v is not None}
        section["shapes"].append(row)
        targets += layer_targets(s, row["ratios"], res)
    return section, targets


def layer_targets(s: LayerShape, ratios: dict, res: GroupResult) -> list[dict]:
    rows = []
    if s.max_vs_dense is not None:
        r = ratios.get("moe/dense")
        rows.append(target_row(f"layer {s.name}: MoE / dense floor", r, "<=", s.max_vs_dense))
    r = ratios.get("hf_best/moe")
    what = "no slower than" if s.min_vs_hf == 1.0 else f">= {s.min_vs_hf:.2f}x faster than"
    name = f"layer {s.name}: MoE {what} HF best ({r['versus'][3:] if r else '-'})"
    rows.append(target_row(name, r, ">=", s.min_vs_hf))
    return rows
