"""train/distributed.py: torchrun data parallelism trains the run one process would."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_testbed.config import ConfigError
from moe_testbed.train.distributed import _buckets, local_accumulation
from moe_testbed.train.trainer import run_training
from tests.train.runs import REPO, final_weights, metric_lines, tiny_cfg

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(args, env, check=True):
    proc = subprocess.run([*TORCHRUN, *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_two_ranks(run_dir, overrides, env, *extra):
    cmd = ["-m", "moe_testbed", "train", str(REPO / "configs/tiny.yaml"), *overrides, "--out", str(run_dir), *extra]
    return torchrun(cmd, env)


def test_grad_accum_is_split_over_ranks():
    assert local_accumulation(8, 1) == 8
    assert local_accumulation(8, 4) == 2
    with pytest.raises(ConfigError, match=r"train.grad_accum=3 .* use train.grad_accum=2"):
        local_accumulation(3, 2)


def test_buckets_split_by_size_and_dtype():
    grads = [torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    sizes = [[g.numel() for g in b] for b in _buckets(grads, limit=32)]
    assert sizes == [[4, 4], [4], [2]]  # 32 bytes = two float32 x4; a new dtype starts a new bucket


PROBE = """
import json, os, sys
import torch
from moe_testbed.train.distributed import init_data_parallel

def native_threads():
    return len(os.listdir(f"/proc/{os.getpid()}/task"))

before = native_threads()
dp = init_data_parallel("cpu")
# What the trainer does after the process group exists: torch.optim (it pulls in torch._dynamo), a step.
import torch.optim
opt_param = torch.nn.Parameter(torch.zeros(3))
opt_param.grad = torch.ones(3)
torch.optim.AdamW([opt_param]).step()
r = dp.rank
both, only0, never = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
both.grad = torch.full((3,), float(r + 1))
if r == 0:
    only0.grad = torch.full((3,), 4.0)
dp.average_gradients([both, only0, never, frozen])
sums = dp.sum({"counts": torch.tensor([r, 10 * r], dtype=torch.long)})
res = {"rank": r, "both": both.grad.tolist(), "only0": only0.grad.tolist(), "never": never.grad,
       "frozen": frozen.grad, "sum": sums["counts"].tolist(), "seed": dp.rank_seed(0)}
dp.close()
res["threads_left"] = native_threads() - before  # gloo's worker threads must be gone
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as fh:  # a file each: stdout lines can interleave
    json.dump(res, fh)
"""


def test_gradients_are_averaged_and_missing_ones_stay_missing(tmp_path, cli_env):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE))
    torchrun([str(script), str(tmp_path)], cli_env)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert res["both"] == [1.5] * 3  # (1 + 2) / 2
        assert res["only0"] == [2.0] * 3  # rank 1 had none: it counts as zero, as it would in one process
        assert res["never"] is None and res["frozen"] is None
        assert res["sum"] == [1, 10]
        assert res["threads_left"] <= 0  # closing the process group ended its threads (see distributed.py)
    assert results[0]["seed"] != results[1]["seed"]


def test_two_ranks_train_the_run_one_process_trains(tiny_data_dir, tmp_path, cli_env):
    # grad_accum=2 over 2 ranks: one micro-batch each, the same two batches as one process.
    overrides = ["train.steps=4", "train.grad_accum=2", "train.log_every=2", "eval.every=2", "train.checkpoint_every=2"]
    one, _ = run_training(tiny_cfg(tiny_data_dir, *overrides), tmp_path / "one", log=lambda *_: None)
    two = tmp_path / "two"
    train_two_ranks(two, [f"data.dir={tiny_data_dir}", "run.progress=none", "train.threads=1", *overrides], cli_env)

    w1, w2 = final_weights(one), final_weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:  # equal up to the order of float additions in the gradient reduction
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    m1, m2 = metric_lines(one), metric_lines(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]  # rank 0 alone wrote the log
    for a, b in zip(m1, m2):
        assert b["tokens"] == a["tokens"]
        for key in ("loss", "val/loss", "util/mean", "val/util/mean", "purity/mean", "val/purity/mean"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["world_size"] == 2


def test_two_ranks_resume_like_an_uninterrupted_run(tiny_data_dir, tmp_path, cli_env):
    # A noisy router draws per-rank random numbers; the checkpoint at step 2 falls inside a
    # 3-step logging window, so the ranks' unlogged statistics must survive the resume.
    overrides = [f"data.dir={tiny_data_dir}", "run.progress=none", "train.threads=1", "train.steps=4",
                 "train.grad_accum=4", "train.log_every=3", "eval.every=4", "train.checkpoint_every=2",
                 "routing.router=noisy_topk"]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_two_ranks(whole, overrides, cli_env)
    train_two_ranks(cut, overrides, cli_env)
    shutil.rmtree(cut / "checkpoints" / "step_000004")  # as if killed after the step-2 checkpoint
    torchrun(["-m", "moe_testbed", "train", "--resume", str(cut)], cli_env)

    ww, wc = final_weights(whole), final_weights(cut)
    assert all(torch.equal(ww[k], wc[k]) for k in ww)
    assert metric_lines(whole) == metric_lines(cut)


@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)])
def test_a_resume_on_another_number_of_ranks_equals_an_uninterrupted_run(tiny_data_dir, tmp_path, cli_env, first, then):
    # The data position is stored as batches of the global order (data/loader.py), so the run
    # continues on the batches an uninterrupted one trains on, whatever the number of ranks.
    overrides = ["train.steps=4", "train.grad_accum=2", "train.log_every=2", "eval.every=2", "train.checkpoint_every=2"]
    whole, _ = run_training(tiny_cfg(tiny_data_dir, *overrides), tmp_path / "whole", log=lambda *_: None)
    cut = tmp_path / "cut"
    flags = [f"data.dir={tiny_data_dir}", "run.progress=none", "train.threads=1", *overrides]
    if first == 1:
        run_training(tiny_cfg(tiny_data_dir, *overrides), cut, log=lambda *_: None)
    else:
        train_two_ranks(cut, flags, cli_env)
    shutil.rmtree(cut / "checkpoints" / "step_000004")  # as if killed after the step-2 checkpoint
    if then == 1:
        run_training(tiny_cfg(tiny_data_dir, *overrides), cut, resume=True, log=lambda *_: None)
    else:
        torchrun(["-m", "moe_testbed", "train", "--resume", str(cut)], cli_env)
    ww, wc = final_weights(whole), final_weights(cut)
    for k in ww:  # equal up to the order of float additions in the gradient reduction
        torch.testing.assert_close(wc[k], ww[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_rank_that_sees_another_checkpoint_is_refused(tmp_path):
    from moe_testbed.train.checkpoint import checkpoint_identity
    from moe_testbed.train.distributed import check_same_checkpoint

    a, b = tmp_path / "step_000004", tmp_path / "other" / "step_000004"
    for path, text in ((a, '{"step": 4}'), (b, '{"step": 4, "x": 1}')):
        path.mkdir(parents=True)
        (path / "manifest.json").write_text(text)
    same = checkpoint_identity(a)
    check_same_checkpoint([same, same], tmp_path)  # shared storage: every rank sees rank 0's file
    with pytest.raises(ConfigError, match=r"rank 1 sees checkpoint None .* storage all nodes share"):
        check_same_checkpoint([same, None], tmp_path)  # a node with its own disk: no checkpoint there
    with pytest.raises(ConfigError, match=r"rank 1 sees checkpoint step_000004:"):
        check_same_checkpoint([same, checkpoint_identity(b)], tmp_path)  # same step, another file
