"""train/expert_parallel.py: experts sharded over ranks compute what one process computes."""

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch

from moe_testbed.analysis.report import write_report
from moe_testbed.analysis.rundir import load_run
from moe_testbed.config import ConfigError
from moe_testbed.train.expert_parallel import rank_load_scalars
from moe_testbed.train.trainer import run_training
from tests.train.runs import final_weights, metric_lines, tiny_cfg
from tests.train.test_distributed import torchrun, train_two_ranks

LAYER_PROBE = """
import json, os, sys
import torch
from moe_testbed.model.experts import GroupedExperts
from moe_testbed.train.distributed import init_data_parallel
from moe_testbed.train.expert_parallel import ExpertParallelExperts

dp = init_data_parallel("cpu")
r, W = dp.rank, dp.world_size
torch.manual_seed(0)  # the same full layer and the same 2 x 12 tokens on both ranks
E, D, H, T, K = 6, 8, 16, 12, 2
full = GroupedExperts(E, D, H, impl="loop")
with torch.no_grad():  # the model's init fills the weights; here by hand
    full.w13.normal_(0, 0.3)
    full.w2.normal_(0, 0.3)
x = torch.randn(W * T, D, requires_grad=True)
idx = torch.stack([torch.randperm(E)[:K] for _ in range(W * T)])
idx[:T] = idx[:T] % 3  # rank 0's tokens all go to rank 0's experts: uneven splits
gate = torch.rand(W * T, K, requires_grad=True)
keep = torch.rand(W * T, K) > 0.2  # capacity drops
y = full(x, idx, gate, keep)
(y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()

ep = ExpertParallelExperts(full, None, r, W)  # None: the world group
mine = slice(r * T, (r + 1) * T)
xl = x.detach()[mine].clone().requires_grad_()
gl = gate.detach()[mine].clone().requires_grad_()
yl = ep(xl, idx[mine], gl, keep[mine])
weights = torch.arange(y.numel()).view_as(y).sin()[mine]
(yl * weights).sum().backward()
lo = r * (E // W)
res = {
    "y": (yl - y.detach()[mine]).abs().max().item(),
    "dx": (xl.grad - x.grad[mine]).abs().max().item(),
    "dgate": (gl.grad - gate.grad[mine]).abs().max().item(),
}
# The shard's gradient sums the tokens of every rank that reached it.
for w in ("w13", "w2"):
    res[w] = (getattr(ep.local, w).grad - getattr(full, w).grad[lo : lo + E // W]).abs().max().item()
dp.close()
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as fh:
    json.dump(res, fh)
"""


def test_expert_parallel_layer_equals_the_single_process_layer(tmp_path, cli_env):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(LAYER_PROBE))
    torchrun([str(script), str(tmp_path)], cli_env)
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        for key, err in res.items():
            assert err < 1e-5, (r, key, err)


EP_RUN = ["train.steps=4", "train.grad_accum=2", "train.log_every=2", "eval.every=2", "train.checkpoint_every=2"]


def test_expert_parallel_training_equals_one_process(tiny_data_dir, tmp_path, cli_env):
    one, _ = run_training(tiny_cfg(tiny_data_dir, *EP_RUN), tmp_path / "one", log=lambda *_: None)
    two = tmp_path / "ep2"
    train_two_ranks(two, [f"data.dir={tiny_data_dir}", "run.progress=none", "train.threads=1",
                          "parallel.expert_parallel=2", *EP_RUN], cli_env)  # fmt: skip

    w1, w2 = final_weights(one), final_weights(two)
    assert w1.keys() == w2.keys()  # the checkpoint holds the unsharded model
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    m1, m2 = metric_lines(one), metric_lines(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for a, b in zip(m1, m2):
        for key in ("loss", "grad_norm", "val/loss", "util/mean", "val/util/mean", "val/purity/mean"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key
    evals = [r for r in m2 if r["kind"] == "eval"]
    assert all(r["val/ep_load/mean"] >= 1.0 for r in evals)  # the per-rank load of the expert shards
    summary = json.loads((two / "summary.json").read_text())
    assert summary["expert_parallel"] == 2 and summary["world_size"] == 2
    run = load_run(two)  # the report shows the load
    assert set(run.ep_load) == {"validation", "training"} and run.ep_load["validation"] == evals[-1]["val/ep_load/mean"]
    html = write_report([two], tmp_path / "report").read_text()
    assert "EP rank load, busiest / mean" in html and f"validation {evals[-1]['val/ep_load/mean']:.3f}" in html
    assert load_run(one).ep_load == {}

    # A one-process checkpoint resumes under EP=2 (the experts and their AdamW moments sliced).
    cut = tmp_path / "cut"
    shutil.copytree(one, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000004")
    torchrun(["-m", "moe_testbed", "train", "--resume", str(cut), "parallel.expert_parallel=2"], cli_env)
    wc = final_weights(cut)
    for k in w1:
        torch.testing.assert_close(wc[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)

    # The unsharded checkpoint resumes in one process: 2 more steps equal 6 uninterrupted ones.
    shutil.rmtree(two / "checkpoints" / "step_000004")
    longer = [*EP_RUN, "train.steps=6"]
    whole, _ = run_training(tiny_cfg(tiny_data_dir, *longer), tmp_path / "whole", log=lambda *_: None)
    run_training(tiny_cfg(tiny_data_dir, *longer), two, resume=True, log=lambda *_: None)
    ww, wr = final_weights(whole), final_weights(two)
    for k in ww:
        torch.testing.assert_close(wr[k], ww[k], rtol=1e-4, atol=1e-5, msg=k)


def test_rank_load_is_the_busiest_rank_over_the_mean_rank():
    # 1 layer, 4 experts on 2 ranks, 2 domains: rank 0 takes 3 + 1 + 2 + 2 = 8 slots, rank 1 takes 4.
    counts = np.array([[[3, 1], [2, 2], [0, 1], [3, 0]]])
    got = rank_load_scalars(counts, ["layer1"], 2, "val/")
    assert got == {"val/ep_load/layer1": pytest.approx(8 / 6), "val/ep_load/mean": pytest.approx(8 / 6)}
    assert rank_load_scalars(counts, ["layer1"], 4)["ep_load/layer1"] == pytest.approx(4 / 3)  # max 4, mean 3


def test_expert_parallel_values_that_cannot_work_are_refused(tiny_data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"expert_parallel=0 must be >= 1"):
        tiny_cfg(tiny_data_dir, "parallel.expert_parallel=0")
    with pytest.raises(ConfigError, match=r"expert_parallel=3 must divide model.n_experts=8"):
        tiny_cfg(tiny_data_dir, "parallel.expert_parallel=3")
    with pytest.raises(ConfigError, match=r"needs an MoE model"):
        tiny_cfg(tiny_data_dir, "parallel.expert_parallel=2", "model.dense=true")
    with pytest.raises(ConfigError, match=r"needs 2 processes .* torchrun --nproc_per_node 2"):
        run_training(tiny_cfg(tiny_data_dir, "parallel.expert_parallel=2"), tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # refused before anything was written
