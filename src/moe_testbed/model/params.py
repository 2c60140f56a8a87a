"""Parameter counts (total and active per token) and dense-baseline sizing."""

from __future__ import annotations

from torch import nn


def active_experts(cfg) -> int:
    """Routed experts that compute for each token: top_k, or all of them for a router that mixes tokens."""
    from moe_testbed.routing.registry import ROUTERS, load_all

    load_all()
    router = ROUTERS.get(cfg.routing.router)
    return cfg.model.n_experts if router is not None and router.mixes_tokens else cfg.routing.top_k


def moe_ffn_params(cfg) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE FFN, router included."""
    m, k = cfg.model, active_experts(cfg)
    expert = 3 * m.d_model * m.expert_hidden
    shared = m.n_shared_experts * expert
    router = m.n_experts * m.d_model
    return m.n_experts * expert + shared + router, k * expert + shared + router


def dense_hidden_for(cfg) -> int:
    """Hidden width of a dense SwiGLU FFN.

    ``model.dense_hidden`` wins when set. Otherwise the width matches one MoE
    FFN of this config in ``active`` or ``total`` parameters (3 * d * h = count),
    rounded to a multiple of 8. Dense layers inside an MoE model (moe_every > 1)
    use the active size, like the dense baseline of equal active parameters.
    """
    m = cfg.model
    if m.dense_hidden:
        return m.dense_hidden
    total, active = moe_ffn_params(cfg)
    target = total if (m.dense and m.dense_match == "total") else active
    return max(8, int(round(target / (3 * m.d_model) / 8)) * 8)


def count_params(model: nn.Module) -> dict[str, int]:
    """Total and active-per-token parameter counts (tied weights counted once)."""
    seen, total, inactive = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if name.endswith(("experts.w13", "experts.w2")):
            E = p.shape[0]
            k = active_experts(model.cfg)
            inactive += p.numel() // E * (E - k)
    embed = model.embed.weight.numel()
    return {"total": total, "active": total - inactive, "embedding": embed, "non_embedding": total - embed}
