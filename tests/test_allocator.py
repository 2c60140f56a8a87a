"""allocator.py: with glibc's thresholds fixed, a training step reuses freed buffers
instead of faulting fresh pages in on every micro-batch."""

import os
import subprocess
import sys

import pytest

# One quick-model training step (1 layer, 8 experts, 4 micro-batches of 512 tokens, the quick
# preset's shape): minor page faults per step. Every buffer stays under glibc's 32 MiB mmap
# ceiling: larger ones (8192-way logits of bigger micro-batches) are mapped afresh whatever the
# setting, and how many faults they cost depends on the kernel's transparent-huge-page mode.
PROBE = """
import ctypes, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever the kernel's THP mode
import torch
from moe_testbed.allocator import keep_freed_memory
from moe_testbed.bench.step import StepSetup, load_step_config, make_train_step
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
torch.set_num_threads(1)
cfg = load_step_config(None, ["model.n_layers=1", "model.n_experts=8"])
step, _, _ = make_train_step(cfg, StepSetup(cfg, 2048, 4, torch.device("cpu"), torch.float32))
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults_per_step(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_TESTBED_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_step_stops_faulting_in_fresh_pages():
    default, tuned = _faults_per_step("default"), _faults_per_step("tuned")
    # Measured: 5-10k faults per step by default (20-40 MiB of fresh pages), 2-580 tuned.
    assert default > 2000
    assert tuned < default / 5


def test_opt_out_leaves_glibc_alone(monkeypatch):
    import moe_testbed.allocator as allocator

    monkeypatch.setenv("MOE_TESTBED_MALLOC", "default")
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.keep_freed_memory() is False
