"""Counts accumulated during training equal counts recomputed offline from the saved assignments."""

import numpy as np
import pytest
import torch

from moe_testbed.config import load_config
from moe_testbed.model import Transformer
from moe_testbed.routing.context import RoutingContext
from moe_testbed.routing.recorder import RoutingRecorder


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_recorded_counts_equal_offline_recount(capacity):
    torch.manual_seed(0)
    E, D, B, S = 6, 3, 4, 8
    cfg = load_config(
        None,
        [
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            f"model.n_experts={E}",
            "model.expert_hidden=16",
            f"balance.capacity_factor={'null' if capacity is None else capacity}",
        ],
    )
    model = Transformer(cfg, vocab_size=40)
    saved = []  # (layer, idx_TK, keep_TK) as the experts saw them
    for i, layer in enumerate(model.moe_layers):
        layer.experts.register_forward_pre_hook(
            lambda mod, args, i=i: saved.append((i, args[1].clone(), None if args[3] is None else args[3].clone()))
        )
    ids = torch.randint(0, 40, (B, S))
    dom = torch.randint(-1, D, (B * S,))  # -1 = padding, never counted
    rec = RoutingRecorder(2, E, D)
    model(ids, RoutingContext(training=True, seq_len=S, domain_ids_T=dom, recorder=rec))

    want = np.zeros((2, E, D), dtype=np.int64)
    drops = np.zeros((2, D), dtype=np.int64)
    for layer, idx, keep in saved:
        for t in range(B * S):
            d = int(dom[t])
            if d < 0:
                continue
            for j in range(idx.shape[1]):
                if keep is None or keep[t, j]:
                    want[layer, int(idx[t, j]), d] += 1
                else:
                    drops[layer, d] += 1
    tables = rec.tables()
    np.testing.assert_array_equal(tables.counts, want)
    np.testing.assert_array_equal(tables.drops, drops)
    assert (drops.sum() > 0) == (capacity is not None)
    real = int((dom >= 0).sum())
    np.testing.assert_array_equal(tables.tokens.sum(1), [real, real])
