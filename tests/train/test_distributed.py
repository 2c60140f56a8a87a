"""train/distributed.py: torchrun data parallelism trains the run one process would."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from moe_testbed.config import ConfigError
from moe_testbed.train.distributed import local_accumulation
from moe_testbed.train.trainer import run_training
from tests.train.runs import REPO, final_weights, metric_lines, tiny_cfg

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(args, env, check=True, timeout=300):
    """Run torchrun in a session of its own, so that a timeout kills the ranks too, not only the launcher."""
    with subprocess.Popen([*TORCHRUN, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:  # fmt: skip
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
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


PROBE = """
import json, os, sys
import torch
from moe_testbed.train.ddp import GradientSync
from moe_testbed.train.distributed import init_data_parallel

def native_threads():
    return len(os.listdir(f"/proc/{os.getpid()}/task"))

before = native_threads()
dp = init_data_parallel("cpu")
r = dp.rank
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1, 2))
        self.tail = torch.nn.Linear(1, 1, bias=False)  # trains in step 1, frozen in step 2
        torch.nn.init.constant_(self.tail.weight, 3.0)

    def forward(self, x):
        return self.tail(x @ self.weight.T)

model = Net()
sync = GradientSync(model, dp.world_size)
steps = []
for step in range(2):
    for f in range(2):  # two forwards a step: the first accumulates locally, the second reduces
        x = torch.full((1, 2), float(2 * r + f + 1))
        with sync.forward(last=f == 1) as module:
            module(x).sum().backward()
        if f == 0:
            local = model.weight.grad.clone()
    tail = model.tail.weight.grad
    steps.append({"weight": model.weight.grad.tolist(), "local_after_first": local.tolist(),
                  "tail": None if tail is None else tail.tolist()})
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0).step()  # imports torch._dynamo
    model.zero_grad(set_to_none=True)
    model.tail.requires_grad_(False)  # as the frozen router does after its warm-up
sums = dp.sum({"counts": torch.tensor([r, 10 * r], dtype=torch.long)})
res = {"rank": r, "steps": steps, "sum": sums["counts"].tolist(), "seed": dp.rank_seed(0)}
del module  # the last forward's module: the wrapper itself
sync.close()  # before the process group goes, as the trainer does
dp.close()
res["threads_left"] = native_threads() - before  # gloo's worker threads must be gone
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as fh:  # a file each: stdout lines can interleave
    json.dump(res, fh)
"""


def test_ddp_averages_once_a_step_and_follows_a_router_that_freezes(tmp_path, cli_env):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE))
    torchrun([str(script), str(tmp_path)], cli_env)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # y = a * (w . x) with w = (1, 1), a = 3: dy/dw = 3 x. Rank r forwards x = 2r+1, then 2r+2 (both entries).
    for res in results:
        first, second = res["steps"]
        r = res["rank"]
        assert first["local_after_first"] == [[3.0 * (2 * r + 1)] * 2]  # no_sync: the first forward stayed local
        assert first["weight"] == [[3.0 * (1 + 2 + 3 + 4) / 2] * 2]  # the ranks' sums, averaged: 15
        assert second["weight"] == first["weight"]  # after the freeze: reduced once, not twice
        # dy/da = w . x = 2x: (2+4 + 6+8) / 2 = 10 while it trains; no gradient (and no hang) once frozen
        assert first["tail"] == [[10.0]] and second["tail"] is None
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


def test_a_run_whose_rank_0_is_killed_reads_as_killed_not_running(tiny_data_dir, tmp_path, cli_env):
    from moe_testbed.train.checkpoint import latest_checkpoint
    from moe_testbed.train.run_dir import summary_status

    run = tmp_path / "run"
    cmd = ["-m", "moe_testbed", "train", str(REPO / "configs/tiny.yaml"), f"data.dir={tiny_data_dir}",
           "run.progress=none", "train.threads=1", "train.steps=100000", "train.checkpoint_every=2", "--out", str(run)]  # fmt: skip
    with subprocess.Popen([*TORCHRUN, *cmd], env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          start_new_session=True) as launcher:  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while latest_checkpoint(run) is None or json.loads((run / "summary.json").read_text())["steps"] < 2:
                assert launcher.poll() is None and time.monotonic() < deadline, "the run ended or never checkpointed"
                time.sleep(0.2)
            summary = json.loads((run / "summary.json").read_text())
            assert summary_status(summary) == "running"
            os.kill(summary["pid"], signal.SIGKILL)  # rank 0: it writes nothing more
            launcher.wait(timeout=60)  # torchrun tears the other rank down
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "running" and summary_status(summary) == "killed"
    assert final_weights(run)  # the latest checkpoint is whole


def test_summary_status_trusts_a_live_or_remote_writer(tmp_path):
    from moe_testbed.train.run_dir import summary_status

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = socket.gethostname()
    assert summary_status({"status": "running", "host": here, "pid": os.getpid()}) == "running"
    assert summary_status({"status": "running", "host": here, "pid": int(dead.stdout)}) == "killed"
    assert summary_status({"status": "running", "host": here + "-elsewhere", "pid": int(dead.stdout)}) == "running"
    assert summary_status({"status": "complete", "host": here, "pid": int(dead.stdout)}) == "complete"
    assert summary_status({}) == "unknown"
