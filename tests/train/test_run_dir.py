"""A result always means what its files say: resume and --out against an existing run, bad inputs, failures.

Each case as the user meets it: the command, its exit code, its one line, and the files it leaves.
"""

from __future__ import annotations

import errno
import json
import pickle
import subprocess
import sys

import pytest

from moe_testbed.config import ConfigError
from moe_testbed.train import checkpoint
from moe_testbed.train.checkpoint import CheckpointError, DiskFull
from moe_testbed.train.trainer import run_training
from tests.train.runs import REPO, tiny_cfg

QUIET = {"log": lambda *_: None}


def cli(args, env):
    return subprocess.run([sys.executable, "-m", "moe_testbed.cli", *args], env=env, capture_output=True, text=True,
                          cwd=REPO)  # fmt: skip


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def short_run(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, "train.steps=4", "train.checkpoint_every=2", "eval.every=2")
    run_dir, _ = run_training(cfg, tmp_path / "run", **QUIET)
    return run_dir


def test_resume_with_changed_settings_is_refused_and_names_the_keys(short_run, cli_env):
    before = (short_run / "config.yaml").read_text()
    err = one_line_error(cli(["train", "--resume", str(short_run), "train.lr=0.03", "train.steps=6"], cli_env),
                         "train.lr: 0.003 -> 0.03", "--out", "--fork")  # fmt: skip
    assert "train.steps" not in err  # extending the run is allowed: only what is not is listed
    assert (short_run / "config.yaml").read_text() == before  # nothing changed


def test_resume_may_extend_a_run_and_records_it(short_run, cli_env):
    proc = cli(["train", "--resume", str(short_run), "train.steps=6"], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "steps: 6" in (short_run / "config.yaml").read_text()
    history = [json.loads(x) for x in (short_run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["how"] == "resume" and history[-1]["changes"] == {"train.steps": [4, 6]}
    assert json.loads((short_run / "summary.json").read_text())["steps"] == 6


def test_out_pointing_at_another_run_is_refused(short_run, cli_env):
    one_line_error(cli(["train", "configs/tiny.yaml", f"data.dir={cli_env['MOE_TESTBED_DATA']}/tiny", "train.lr=0.03",
                        "--out", str(short_run)], cli_env), str(short_run), "train.lr")  # fmt: skip


def test_a_different_model_shape_is_named_and_a_fork_may_not_change_it(short_run, cli_env, tmp_path):
    one_line_error(cli(["train", "--resume", str(short_run), "model.n_experts=4"], cli_env), "model.n_experts: 8 -> 4")
    err = one_line_error(cli(["train", "--resume", str(short_run), "model.n_experts=4", "--fork",
                              str(tmp_path / "fork")], cli_env), "another shape")  # fmt: skip
    assert "Traceback" not in err


def test_fork_continues_from_the_checkpoint_under_the_new_config(short_run, cli_env, tmp_path):
    fork = tmp_path / "fork"
    proc = cli(["train", "--resume", str(short_run), "train.lr=0.03", "train.steps=6", "--fork", str(fork)], cli_env)
    assert proc.returncode == 0, proc.stderr
    history = json.loads((fork / "config_history.jsonl").read_text())
    assert history["how"].startswith(f"fork of {short_run}") and history["changes"]["train.lr"] == [0.003, 0.03]
    assert json.loads((fork / "summary.json").read_text())["steps"] == 6
    assert "lr: 0.003" in (short_run / "config.yaml").read_text()  # the source run is untouched


def test_resume_without_a_checkpoint_starts_over_with_clean_metrics(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, "train.steps=2", "train.checkpoint_every=100", "eval.every=1")
    run_dir = tmp_path / "run"
    run_training(cfg, run_dir, **QUIET)
    for ckpt in (run_dir / "checkpoints").iterdir():  # as if the first attempt died before a checkpoint
        checkpoint.shutil.rmtree(ckpt)
    (run_dir / "metrics.jsonl").write_text('{"kind": "eval", "step": 1, "val/loss": 99.0}\n')
    run_training(cfg, run_dir, resume=True, **QUIET)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("val/loss") != 99.0 for r in lines)  # the dead attempt's records are gone, not repeated
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [1, 2]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=-0.001", "train.lr=-0.001 must be > 0"),
        ("train.beta2=1.0", "train.beta2=1.0 must be in [0, 1)"),
        ("train.warmup_steps=-1", "train.warmup_steps=-1 must be >= 0"),
        ("balance.coeff=-1", "balance.coeff=-1.0 must be >= 0"),
        ("balance.capacity_factor=-2", "balance.capacity_factor=-2.0 must be > 0"),
        ("balance.ba_iters=0", "balance.ba_iters=0 must be >= 1"),
        ("train.grad_clip=0", "train.grad_clip=0.0 must be > 0"),
    ],
)
def test_every_bad_number_is_one_line(cli_env, override, needle):
    one_line_error(cli(["train", "configs/tiny.yaml", override], cli_env), needle)


def test_empty_config_and_unknown_group_domains(tiny_data_dir, tmp_path, cli_env):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    one_line_error(cli(["train", str(empty)], cli_env), "is empty", "configs/quick.yaml")
    cfg = tiny_cfg(tiny_data_dir, "routing.router=reference", "balance.method=none",
                   "routing.groups={klingon: [0, 1]}")  # fmt: skip
    with pytest.raises(ConfigError, match="routing.groups names 'klingon', which is not a domain of the mix"):
        run_training(cfg, tmp_path / "ref", **QUIET)


def test_disk_full_leaves_a_failed_summary_and_no_partial_checkpoint(tiny_data_dir, tmp_path, monkeypatch):
    def full(state, tensors_path, json_path):  # the disk fills up halfway through the state
        tensors_path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(json_path))

    monkeypatch.setattr(checkpoint, "save_state", full)
    cfg = tiny_cfg(tiny_data_dir, "train.steps=2", "train.checkpoint_every=2")
    with pytest.raises(DiskFull, match=r"disk full while writing checkpoint .*step_000002 \(about \d+ MiB needed"):
        run_training(cfg, tmp_path / "run", **QUIET)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"].startswith("DiskFull: disk full while writing")
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/moe_testbed_pwned", "w"))  # what a crafted state.pt could do when unpickled


def test_a_crafted_pickle_in_a_run_directory_cannot_run_code(short_run, tmp_path, cli_env):
    import hashlib
    import os

    ckpt = sorted((short_run / "checkpoints").glob("step_*"))[-1]
    (ckpt / "state.pt").write_bytes(pickle.dumps({"step": _Payload()}))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"] = {"model.safetensors": manifest["sha256"]["model.safetensors"],
                          "state.pt": hashlib.sha256((ckpt / "state.pt").read_bytes()).hexdigest()}  # fmt: skip
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    if os.path.exists("/tmp/moe_testbed_pwned"):
        os.remove("/tmp/moe_testbed_pwned")
    one_line_error(cli(["train", "--resume", str(short_run), "train.steps=6"], cli_env), "pickle", "start the run")
    assert not os.path.exists("/tmp/moe_testbed_pwned")
    with pytest.raises(CheckpointError):
        checkpoint.verify_checkpoint(ckpt)
