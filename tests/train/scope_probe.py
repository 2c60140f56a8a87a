"""Train the toy model for a few steps under one layout of the step, and report what routing did.

A layout is the number of data-parallel ranks and the micro-batches a rank
forwards at once. The balancing scope promises that the layout does not change
the result (docs/routing.md#scope); tests/train/test_scope_invariance.py runs
every case here in one process and under ``torchrun --nproc_per_node 2`` and
compares: routing selections (identical), losses and weights (to float tolerance).

    python -m torch.distributed.run --nproc_per_node 2 tests/train/scope_probe.py OUT.json [PER_FORWARD]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_testbed.train.ddp import GradientSync  # noqa: E402
from moe_testbed.train.distributed import DataParallel, init_data_parallel  # noqa: E402
from moe_testbed.train.step import micro_step, optimizer_step  # noqa: E402
from tests.routing.toy import batch, make_cfg, make_model  # noqa: E402

STEPS, ACCUM, MBS, SEQ = 3, 4, 2, 8  # a step: 4 micro-batches of 2 sequences of 8 tokens
CASES = {  # name -> (router, method, scope, other keys)
    **{
        f"{m}-{s}": ("softmax_topk", m, s, {})
        for m in ("none", "lbl", "eb", "sh", "ba", "qb")
        for s in ("sequence", "microbatch", "global")
    },  # fmt: skip
    "ba-remainder-sequence": ("softmax_topk", "ba", "sequence", {"model.n_experts": 6, "routing.top_k": 1}),
    "ba-remainder-microbatch": ("softmax_topk", "ba", "microbatch", {"model.n_experts": 6, "routing.top_k": 1}),
    "lbl-z-global": ("softmax_topk", "lbl", "global", {"balance.z_loss": 0.01}),
    "capacity-global": ("softmax_topk", "lbl", "global", {"balance.capacity_factor": 1.0}),
    **{f"expert_choice-{s}": ("expert_choice", "none", s, {}) for s in ("sequence", "microbatch", "global")},
}


def run_case(name: str, dp: DataParallel, per_forward: int) -> dict:
    router, method, scope, extra = CASES[name]
    cfg = make_cfg(router, method, scope, **{"balance.eb_rate": 0.05, **extra})
    if method == "lbl":
        cfg = cfg.replace({"balance.coeff": 0.1})
    model = make_model(cfg)
    dp.broadcast_model(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sync = GradientSync(model, dp.world_size)
    W, rank, local = dp.world_size, dp.rank, ACCUM // dp.world_size
    forwards = local // per_forward
    chosen: dict[int, list] = {}
    current = {}

    def hook(module, args, dec):  # layer 0's experts per token, by the step's micro-batch id
        if not args[1].training:
            return
        ctx = args[1]
        per = dec.idx_TK.sort(-1).values.view(-1, MBS * SEQ, dec.idx_TK.shape[1])
        for b in range(per.shape[0]):
            chosen[current["step"] * 100 + (ctx.microbatch + b) * W + rank] = per[b].tolist()

    model.moe_layers[0].router.register_forward_hook(hook)
    losses = []
    for step in range(STEPS):
        current["step"] = step
        total = torch.zeros(())
        for f in range(forwards):
            parts = [
                batch(step * ACCUM + (f * per_forward + i) * W + rank, MBS, SEQ, pad=0) for i in range(per_forward)
            ]
            ids, tgt, dom = (torch.cat(x) for x in zip(*parts))
            with sync.forward(last=f == forwards - 1) as module:
                ce, aux = micro_step(module, ids, tgt, dom.view(-1, SEQ), step=step, microbatch=f * per_forward,
                                     accum=forwards, microbatch_size=MBS, whole_step=forwards == 1,
                                     group=dp.group)  # fmt: skip
            total += (ce + sum(aux.values())) / forwards
        losses.append(float(dp.sum({"l": total})["l"]) / W)
        optimizer_step(model, opt, None, step + 1)
    sync.close()
    merged = {}
    for part in dp.gather_objects(chosen):
        merged.update(part)
    weights = {k: v.tolist() for k, v in model.state_dict().items() if v.is_floating_point()}
    return {"losses": losses, "chosen": {str(k): merged[k] for k in sorted(merged)}, "weights": weights}


def main() -> None:
    out, per_forward = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0
    dp = init_data_parallel("cpu")
    results = {}
    for name in CASES:
        n = per_forward or ACCUM // dp.world_size
        results[name] = run_case(name, dp, n)
    if dp.rank == 0:
        out.write_text(json.dumps(results))
    dp.close()


if __name__ == "__main__":
    main()
