"""train/upcycle.py: an MoE started from a trained dense run computes what the dense model computes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from moe_testbed.config import ConfigError
from moe_testbed.model.experts import GroupedExperts
from moe_testbed.model.ffn import SwiGLU
from moe_testbed.routing.context import RoutingContext
from moe_testbed.train.checkpoint import latest_checkpoint
from moe_testbed.train.trainer import Trainer, run_training
from moe_testbed.train.upcycle import _experts_from_ffn
from tests.train.runs import tiny_cfg

SHORT = ["train.steps=2", "train.checkpoint_every=2", "eval.every=2"]


@pytest.fixture(scope="module")
def dense_run(tiny_data_dir, tmp_path_factory):
    cfg = tiny_cfg(tiny_data_dir, *SHORT, "model.dense=true", "model.dense_hidden=64")
    run_dir, _ = run_training(cfg, tmp_path_factory.mktemp("dense") / "d", log=lambda *_: None)
    return run_dir


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids, RoutingContext(seq_len=ids.shape[1], domain_ids_T=torch.zeros(ids.numel(), dtype=torch.long))
                     ).logits  # fmt: skip


def test_copied_experts_compute_the_dense_model(dense_run, tiny_data_dir, tmp_path):
    # every expert a copy of its block's FFN, gates renormalised to sum 1: the dense model's function
    moe = Trainer(tiny_cfg(tiny_data_dir, *SHORT, f"model.init_from={dense_run}"), tmp_path / "u", log=lambda *_: None)
    dense = Trainer(tiny_cfg(tiny_data_dir, *SHORT, "model.dense=true", "model.dense_hidden=64"), tmp_path / "d2",
                    log=lambda *_: None)  # fmt: skip
    dense.model.load_state_dict(load_file(str(latest_checkpoint(dense_run) / "model.safetensors")), strict=False)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(moe.model, ids), logits(dense.model, ids), rtol=1e-4, atol=1e-5)
    w13 = moe.model.blocks[0].ffn.experts.w13
    assert all(torch.equal(w13[0], w13[e]) for e in range(w13.shape[0]))
    assert moe.init_from.endswith(latest_checkpoint(dense_run).name + ":" + moe.init_from.rsplit(":", 1)[1])


def test_noise_makes_the_copies_differ(dense_run, tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, *SHORT, f"model.init_from={dense_run}", "model.upcycle_noise=0.01")
    w13 = Trainer(cfg, tmp_path / "n", log=lambda *_: None).model.blocks[0].ffn.experts.w13
    assert not torch.equal(w13[0], w13[1])
    assert (w13[0] - w13[1]).abs().max() < 0.1 * w13[0].abs().max()  # small: 1% relative


def test_fine_grained_slices_sum_to_the_dense_ffn():
    torch.manual_seed(0)
    ffn = SwiGLU(8, 12)
    experts = GroupedExperts(6, 8, 4)  # G = 3 slices of 4 hidden units, each on 2 experts
    _experts_from_ffn(experts, {f"b.{k}": v for k, v in ffn.state_dict().items()}, "b", 0.0,
                      torch.Generator(), "x")  # fmt: skip
    x = torch.randn(5, 8)
    idx = torch.tensor([[0, 1, 2]] * 5)  # the three distinct slices
    out = experts(x, idx, torch.full((5, 3), 1 / 3))
    torch.testing.assert_close(out, ffn(x), rtol=1e-5, atol=1e-6)


def test_bad_sources_are_refused(dense_run, tiny_data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"no checkpoint there"):
        Trainer(tiny_cfg(tiny_data_dir, f"model.init_from={tmp_path}"), tmp_path / "a", log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"the dense run must have the same width"):
        Trainer(tiny_cfg(tiny_data_dir, f"model.init_from={dense_run}", "model.d_model=32"), tmp_path / "b",
                log=lambda *_: None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"do not split into experts of model.expert_hidden=48"):
        Trainer(tiny_cfg(tiny_data_dir, f"model.init_from={dense_run}", "model.expert_hidden=48"), tmp_path / "c",
                log=lambda *_: None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.upcycle_noise=0.1 must be >= 0 and needs model.init_from"):
        tiny_cfg(tiny_data_dir, "model.upcycle_noise=0.1")
