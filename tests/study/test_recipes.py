"""configs/recipes/: every named system's recipe loads, trains, and the recipes study runs exactly the recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_testbed.config import load_config
from moe_testbed.study.plan import expand
from moe_testbed.study.spec import load_spec
from moe_testbed.train.trainer import run_training

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
SMALL = ["data.preset=tiny", "data.seq_len=32", "train.steps=1", "train.micro_batch_size=2", "train.grad_accum=2",
         "train.warmup_steps=0", "eval.every=1", "eval.tokens_per_domain=64", "run.progress=none", "train.threads=1"]  # fmt: skip


def test_there_is_a_recipe_for_every_named_system():
    assert {p.stem for p in RECIPES} == {"switch", "mixtral", "deepseek-moe", "deepseek-v3", "olmoe", "qwen3-moe",
                                         "megablocks", "soft-moe"}  # fmt: skip


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_trains(path, tiny_data_dir, tmp_path):
    cfg = load_config(path, [*SMALL, f"data.dir={tiny_data_dir}"])
    run_dir, _ = run_training(cfg, tmp_path / path.stem, log=lambda *_: None)
    assert (run_dir / "summary.json").is_file()


def test_the_recipes_study_runs_the_recipes():
    runs = expand(load_spec("recipes"))
    assert all(run.skip is None for run in runs) and len(runs) == 3 * len(RECIPES)
    by_name = {run.config: run for run in runs}
    assert set(by_name) == {p.stem for p in RECIPES}
    for path in RECIPES:
        want, got = load_config(path, []).to_dict(), by_name[path.stem].cfg.to_dict()
        for section in ("model", "routing", "balance"):
            assert got[section] == want[section], f"{path.stem}: {section}"
