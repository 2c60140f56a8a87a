"""What a run says about itself when it starts (the trainer logs it; rank 0 only)."""

from __future__ import annotations

from moe_testbed.routing.groups import describe_groups
from moe_testbed.routing.registry import ROUTERS


def describe(trainer) -> str:
    """The lines a run prints when it starts: directory, data, parameters, routing, parallelism, warnings."""
    cfg, p = trainer.cfg, trainer.params
    lines = [
        f"run dir     {trainer.run_dir}",
        f"data        {trainer.mix.path} ({len(trainer.domains)} domains, vocab {trainer.mix.vocab_size})",
        f"parameters  total {p['total'] / 1e6:.2f}M, active per token {p['active'] / 1e6:.2f}M "
        f"(embedding {p['embedding'] / 1e6:.2f}M)",
    ]
    if cfg.model.dense:
        lines.append(f"model       dense baseline (FFN sized to equal {cfg.model.dense_match} parameters)")
    else:
        lines.append(
            f"routing     {cfg.routing.router}, top-{cfg.routing.top_k} of {cfg.model.n_experts}, "
            f"balance {cfg.balance.method} at {cfg.balance.scope} scope, capacity {cfg.balance.capacity_factor}"
        )
        if ROUTERS[cfg.routing.router].uses_domain_groups:
            lines.append(f"groups      {describe_groups(trainer.domains, trainer.groups)}")
    if trainer.world_size > 1:
        lines.append(
            f"parallel    {trainer.world_size} data-parallel ranks on {trainer.device.type}, {trainer.accum} of the "
            f"{cfg.train.grad_accum} micro-batches per step each"
            + (f"; experts sharded over groups of {trainer.ep.size} ({cfg.model.n_experts // trainer.ep.size} a rank)"
               if trainer.ep else "")
        )  # fmt: skip
    lines.append(f"forwards    {trainer.accum // trainer.per_forward} per step of {trainer.per_forward} micro-batches"
                 + (f"; global scope {trainer.global_scope}" if trainer.global_scope else ""))  # fmt: skip
    lines += [f"warning     {w}" for w in trainer.warnings]
    return "\n".join(lines)
