import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from moe_testbed.config import load_config
from moe_testbed.train.checkpoint import CheckpointError
from moe_testbed.train.trainer import run_training
from tests.train.runs import REPO, final_weights, metric_lines, tiny_cfg


def test_training_lowers_loss_and_writes_run_dir(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, "train.steps=30", "train.lr=0.01")
    run_dir, final = run_training(cfg, tmp_path / "run", log=lambda *_: None)
    lines = metric_lines(run_dir)
    train = [r for r in lines if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert "util/L0" in train[-1] and "purity/mean" in train[-1] and "aux/lbl" in train[-1]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert evals and "val/loss" in evals[-1] and "val/specialization/mean" in evals[-1]
    assert (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml") == cfg
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 30
    assert summary["params_active"] < summary["params_total"]
    # The last training log's routing means: dropless here, so no drops.
    assert summary["train_routing"]["train/drop_rate/mean"] == 0.0
    assert summary["train_routing"]["train/util/mean"] == train[-1]["util/mean"]
    snaps = sorted((run_dir / "routing").glob("step_*.npz"))
    assert snaps, "routing tables are saved at every evaluation"


def test_same_seed_same_weights(tiny_data_dir, tmp_path):
    a, _ = run_training(tiny_cfg(tiny_data_dir, "train.steps=4"), tmp_path / "a", log=lambda *_: None)
    b, _ = run_training(tiny_cfg(tiny_data_dir, "train.steps=4"), tmp_path / "b", log=lambda *_: None)
    c, _ = run_training(tiny_cfg(tiny_data_dir, "train.steps=4", "train.seed=1"), tmp_path / "c", log=lambda *_: None)
    wa, wb, wc = final_weights(a), final_weights(b), final_weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("method", ["lbl"])
def test_sigkill_and_resume_is_bitwise_identical(tiny_data_dir, tmp_path, cli_env, method):
    overrides = [f"data.dir={tiny_data_dir}", "run.progress=none", "train.threads=1", "train.steps=16",
                 "train.checkpoint_every=2", "train.log_every=2", "eval.every=4", f"balance.method={method}"]  # fmt: skip
    whole = tmp_path / "whole"
    run_training(load_config(REPO / "configs/tiny.yaml", overrides), whole, log=lambda *_: None)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moe_testbed.cli", "train", str(REPO / "configs/tiny.yaml"), *overrides,
           "--out", str(killed)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "checkpoints").glob("step_00000[6-9]")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "running", "the run was killed before it finished"
    rc = subprocess.run([sys.executable, "-m", "moe_testbed.cli", "train", "--resume", str(killed)], env=cli_env,
                        capture_output=True, text=True)  # fmt: skip
    assert rc.returncode == 0, rc.stderr
    wa, wb = final_weights(whole), final_weights(killed)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metric_lines(whole) == metric_lines(killed)


def test_corrupted_checkpoint_is_reported(tiny_data_dir, tmp_path, cli_env):
    run_dir, _ = run_training(tiny_cfg(tiny_data_dir, "train.steps=4", "train.checkpoint_every=2"), tmp_path / "r",
                              log=lambda *_: None)  # fmt: skip
    latest = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    cfg = load_config(run_dir / "config.yaml", ["train.steps=6"])
    with pytest.raises(CheckpointError, match="corrupted"):
        run_training(cfg, run_dir, resume=True, log=lambda *_: None)
    rc = subprocess.run([sys.executable, "-m", "moe_testbed.cli", "train", "--resume", str(run_dir), "train.steps=6"],
                        env=cli_env, capture_output=True, text=True)  # fmt: skip
    assert rc.returncode == 2
    assert (
        rc.stderr.strip().startswith("error:") and "corrupted" in rc.stderr and len(rc.stderr.strip().splitlines()) == 1
    )


def test_cli_bad_key_exits_2_with_one_line(cli_env):
    rc = subprocess.run([sys.executable, "-m", "moe_testbed.cli", "train", "configs/tiny.yaml", "model.n_expert=4"],
                        cwd=REPO, env=cli_env, capture_output=True, text=True)  # fmt: skip
    assert rc.returncode == 2
    assert rc.stderr.strip() == (
        "error: unknown key model.n_expert: allowed keys are " + rc.stderr.split("allowed keys are ")[1].strip()
    )
    assert len(rc.stderr.strip().splitlines()) == 1 and "Traceback" not in rc.stderr


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "moe_testbed.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    for command in ("train", "data", "report"):
        assert command in out.stdout
