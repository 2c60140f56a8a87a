"""Correctness guard: a variant is timed only if it computes the right thing.

Before any timing, every variant runs one forward and backward in its own dtype
(fp32 on CPU) and its output, the input's gradient and its parameters'
gradients (mapped to one common layout) are compared with a float64 reference
computed with the same weights. The error of record is the relative error
``||got - want||_2 / ||want||_2`` per tensor, which must be below ``tol``
(1e-5 for fp32; bf16 runs use a looser tolerance and say so). A variant that
fails is not timed, and the report says so.

The MoE reference is written independently of ``model/experts.py`` (a per-expert
``nonzero`` + ``index_add`` loop under plain autograd, in float64), so that a
wrong dispatch or a wrong hand-written backward cannot agree with itself.
Routing must be identical in fp32 and float64 for the comparison to mean
anything: :func:`untie_routing` nudges the few tokens whose k-th and (k+1)-th
router probabilities are nearly tied, so no rounding can flip a choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

FP32_TOL = 1e-5


@dataclass
class GuardResult:
    ok: bool
    errors: dict[str, float] = field(default_factory=dict)  # relative error per compared tensor
    message: str = ""

    def to_json(self) -> dict:
        return {"ok": self.ok, "max_rel_err": max(self.errors.values(), default=0.0), "errors": self.errors,
                "message": self.message}  # fmt: skip


def rel_err(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    denom = want.norm().item()
    diff = (got - want).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


def compare(got: dict[str, Tensor | None], want: dict[str, Tensor], tol: float) -> GuardResult:
    errors: dict[str, float] = {}
    for key, w in want.items():
        g = got.get(key)
        errors[key] = float("inf") if g is None else rel_err(g, w)
    bad = {k: v for k, v in errors.items() if not v < tol}  # `not <` also catches NaN
    if bad:
        worst = max(bad, key=lambda k: bad[k])
        return GuardResult(False, errors, f"{worst}: relative error {bad[worst]:.2e} >= {tol:.0e}")
    return GuardResult(True, errors, "")


def check(run: Callable[[], dict[str, Tensor | None]], want: dict[str, Tensor], tol: float) -> GuardResult:
    """Run a variant once (forward + backward) and compare; an exception is a failure, not a crash."""
    try:
        got = run()
    except Exception as exc:  # a variant that cannot run is refused like a wrong one
        return GuardResult(False, {}, f"raised {type(exc).__name__}: {exc}")
    return compare(got, want, tol)


def reference_moe(x_TD: Tensor, router_ED: Tensor, w13_EDH2: Tensor, w2_EHD: Tensor, k: int) -> Tensor:
    """Softmax top-k router with renormalised gates and SwiGLU experts, the obvious way."""
    probs_TE = torch.softmax(x_TD @ router_ED.t(), dim=-1)
    gate_TK, idx_TK = probs_TE.topk(k, dim=-1)
    gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True)
    out_TD = torch.zeros_like(x_TD)
    for e in range(router_ED.shape[0]):
        t, j = (idx_TK == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        a, b = (x_TD[t] @ w13_EDH2[e]).chunk(2, dim=-1)
        out_TD = out_TD.index_add(0, t, gate_TK[t, j, None] * ((F.silu(a) * b) @ w2_EHD[e]))
    return out_TD


def reference_grads(fn: Callable[..., Tensor], x: Tensor, g: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """float64 output and gradients of ``fn(x, *params)`` for the output gradient ``g``."""
    x64 = x.detach().double().requires_grad_(True)
    p64 = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    out = fn(x64, *p64.values())
    out.backward(g.double())
    return {"out": out.detach(), "grad_x": x64.grad, **{f"grad_{k}": v.grad for k, v in p64.items()}}


@torch.no_grad()
def untie_routing(x_TD: Tensor, router_ED: Tensor, k: int, margin: float = 1e-4, max_rounds: int = 20) -> Tensor:
    """Resample tokens whose k-th and (k+1)-th router probabilities are within ``margin`` (relative).

    fp32 and float64 must choose the same experts, or the outputs differ by a
    whole expert for that token; with random data a near-tie among 64 experts
    and 4096 tokens is likely enough to matter.
    """
    E = router_ED.shape[0]
    if k >= E:
        return x_TD
    x = x_TD.clone()
    gen = torch.Generator(device="cpu").manual_seed(1234)
    for _ in range(max_rounds):
        probs = torch.softmax(x.double() @ router_ED.double().t(), dim=-1)
        top = probs.topk(k + 1, dim=-1).values
        tied = (top[:, k - 1] - top[:, k]) < margin * top[:, k - 1]
        if not bool(tied.any()):
            return x
        n = int(tied.sum())
        x[tied] = torch.randn(n, x.shape[1], generator=gen, dtype=x.dtype).to(x.device)
    raise RuntimeError("could not untie the routing of the benchmark inputs")
