"""How a step is executed does not change the result (docs/routing.md#scope).

Every method at every scope, trained by the toy model of tests/train/scope_probe.py:

- one process, the whole step in one forward, is the reference;
- at sequence and micro-batch scope, forwarding 2 or 1 micro-batches at a time
  gives the same routing selections, and losses and weights to float tolerance;
- two data-parallel ranks (real torchrun, gloo), each forwarding its whole share,
  give the same at every scope, global included (counts all-reduced, scores
  gathered in the step's order);
- at global scope a step in several forwards falls back to carried statistics:
  the run says so, and the difference from the exact step is measured and bounded.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_testbed.train.distributed import DataParallel
from moe_testbed.train.trainer import run_training
from tests.train.runs import tiny_cfg
from tests.train.scope_probe import ACCUM, CASES, run_case
from tests.train.test_distributed import torchrun

ALONE = DataParallel(torch.device("cpu"))
LOCAL_SCOPES = [name for name, case in CASES.items() if case[2] != "global"]
GLOBAL = [name for name, case in CASES.items() if case[2] == "global"]


@pytest.fixture(scope="module")
def reference() -> dict:
    return {name: run_case(name, ALONE, ACCUM) for name in CASES}


def assert_same_run(got: dict, want: dict, name: str, atol: float = 2e-5) -> None:
    assert got["chosen"] == want["chosen"], f"{name}: routing selections differ"
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5), name
    for key, w in want["weights"].items():
        torch.testing.assert_close(torch.tensor(got["weights"][key]), torch.tensor(w), atol=atol, rtol=1e-4,
                                   msg=lambda m, k=key: f"{name} {k}: {m}")  # fmt: skip


@pytest.mark.parametrize("per_forward", [2, 1])
@pytest.mark.parametrize("name", LOCAL_SCOPES)
def test_local_scopes_do_not_depend_on_the_forwards_size(reference, name, per_forward):
    assert_same_run(run_case(name, ALONE, per_forward), reference[name], name)


def test_two_ranks_reproduce_one_process_at_every_scope(reference, tmp_path, cli_env):
    out = tmp_path / "two_ranks.json"
    torchrun(["tests/train/scope_probe.py", str(out)], {**cli_env, "PYTHONPATH": cli_env["PYTHONPATH"]})
    two = json.loads(out.read_text())
    assert set(two) == set(CASES)
    for name in CASES:
        assert_same_run(two[name], reference[name], name)


@pytest.mark.parametrize("name", [n for n in GLOBAL if not n.startswith("expert_choice")])
def test_global_scope_in_several_forwards_is_carried_and_close(reference, name):
    carried = run_case(name, ALONE, 1)
    exact = reference[name]
    # The first step is the same up to the carried state (LBL: the running counts; SH/BA: no prices yet).
    gaps = [abs(a - b) / b for a, b in zip(carried["losses"], exact["losses"])]
    assert max(gaps) < 0.01, f"{name}: carried global scope is {max(gaps):.2%} off the exact step"
    if CASES[name][1] in ("sh", "ba"):  # plain top-k at carried prices, not the exact solve
        assert carried["chosen"] != exact["chosen"]


def test_a_run_that_falls_back_says_so(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, "balance.scope=global", "train.steps=2", "train.forward_microbatches=1")
    run_dir, _ = run_training(cfg, tmp_path / "carried", log=lambda *_: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_scope"] == "carried" and summary["forward_microbatches"] == 1
    assert any("carried from the previous step" in w for w in summary["warnings"])
    exact = tiny_cfg(tiny_data_dir, "balance.scope=global", "train.steps=2")
    run_dir, _ = run_training(exact, tmp_path / "exact", log=lambda *_: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_scope"] == "exact" and summary["forward_microbatches"] == exact.train.grad_accum


def test_expert_choice_at_global_scope_needs_the_whole_step(tiny_data_dir, tmp_path):
    from moe_testbed.config import ConfigError

    cfg = tiny_cfg(tiny_data_dir, "routing.router=expert_choice", "balance.method=none", "balance.scope=global",
                   "train.forward_microbatches=1")  # fmt: skip
    with pytest.raises(ConfigError, match="expert_choice at balance.scope=global needs the whole step"):
        run_training(cfg, tmp_path / "ec", log=lambda *_: None)
