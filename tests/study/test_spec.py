"""Spec loading and grid expansion: pure, no training and no worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_testbed.study import StudyError
from moe_testbed.study.plan import auto_name, expand, parse_cli_overrides, select
from moe_testbed.study.spec import load_spec, preset_names, spec_from_dict

BASE = {"model": {"n_experts": 8, "d_model": 32, "n_heads": 2}, "routing": {"top_k": 2}}


def spec(**study):
    return spec_from_dict({"base": BASE, **study}, default_name="t")


def test_grid_is_the_cartesian_product_in_spec_order():
    runs = expand(spec(grid={"balance.scope": ["sequence", "global"], "train.seed": [0, 1]}))
    assert [r.name for r in runs] == ["sequence-seed0", "sequence-seed1", "global-seed0", "global-seed1"]
    assert runs[1].values == {"balance.scope": "sequence", "train.seed": 1}
    assert runs[1].cfg.balance.scope == "sequence" and runs[1].cfg.train.seed == 1
    assert runs[1].cfg.model.n_experts == 8  # the base is kept
    assert all(r.skip is None for r in runs)
    assert runs[0].cfg.run.name == "sequence-seed0"


def test_extra_runs_name_format_and_run_grids():
    s = spec(
        grid={"balance.scope": ["microbatch", "global"]},
        name_format="lbl-{balance.scope}",
        runs=[
            {"name": "dense", "model.dense": True},
            {"routing.top_k": 1},  # no name: derived from its values
            {"name": "cf", "grid": {"balance.capacity_factor": [1.0, None]}},  # name + grid point
            {"name": "s{train.seed}", "grid": {"train.seed": [3]}},  # template
        ],
    )
    runs = expand(s)
    names = [r.name for r in runs]
    assert names == ["lbl-microbatch", "lbl-global", "dense", "top_k1", "cf-1.0", "cf-none", "s3"]
    assert runs[2].cfg.model.dense is True and runs[2].cfg.balance.scope == "microbatch"  # base scope
    assert runs[5].cfg.balance.capacity_factor is None
    assert s.varied_keys() == ["balance.scope", "model.dense", "routing.top_k", "balance.capacity_factor", "train.seed"]


def test_invalid_combinations_are_skipped_with_the_reason():
    runs = expand(spec(grid={"routing.top_k": [2, 9], "balance.method": ["lbl", "no_such_method"]}))
    by_name = {r.name: r for r in runs}
    assert by_name["top_k2-lbl"].skip is None
    assert "routing.top_k=9 exceeds model.n_experts=8" in by_name["top_k9-lbl"].skip
    assert "no_such_method" in by_name["top_k2-no_such_method"].skip
    assert len(runs) == 4  # skipped runs stay in the plan (and in the results table)


def test_precedence_base_overrides_cli_run():
    s = spec(overrides={"train.steps": 7, "train.lr": 0.1}, grid={"train.seed": [0]}, runs=[{"train.lr": 0.5}])
    runs = expand(s, parse_cli_overrides(["train.steps=3"]))
    assert runs[0].cfg.train.steps == 3 and runs[0].cfg.train.lr == 0.1
    assert runs[1].cfg.train.lr == 0.5  # the run's own value wins


@pytest.mark.parametrize(
    "study, message",
    [
        ({"grid": {"balance.scop": ["global"]}}, "did you mean balance.scope"),
        ({"grid": {"balance.scope": "global"}}, "must be a non-empty list"),
        ({"grid": {"balance.scope": []}}, "must be a non-empty list"),
        ({"grd": {}}, "unknown top-level key 'grd'"),
        ({}, "needs a grid or runs"),
        ({"runs": [{"name": "a"}]}, "sets no config key"),
        ({"runs": [{"name": "a", "train.seed": 1}, {"name": "a", "train.seed": 2}]}, "several runs are named 'a'"),
        ({"grid": {"train.steps": ["many"]}}, "expected an integer"),
        ({"grid": {"train.seed": [1]}, "name_format": "{train.sed}"}, "unknown key 'train.sed'"),
    ],
)
def test_spec_mistakes_are_study_errors(study, message):
    with pytest.raises(StudyError, match=message):
        expand(spec(**study))


def test_cli_override_of_a_varied_key_is_refused():
    with pytest.raises(StudyError, match="varied by study"):
        expand(spec(grid={"balance.scope": ["global"]}), {"balance.scope": "sequence"})
    with pytest.raises(StudyError, match="section.key=value"):
        parse_cli_overrides(["train.steps"])


def test_only_filters_by_substring():
    runs = expand(spec(grid={"balance.scope": ["sequence", "microbatch", "global"]}))
    assert [r.name for r in select(runs, ["glob", "seq"])] == ["sequence", "global"]
    assert select(runs, None) == runs
    with pytest.raises(StudyError, match="matches no run"):
        select(runs, ["nothing"])


def test_auto_names():
    assert auto_name({"balance.method": "lbl", "model.dense": True, "balance.capacity_factor": None}) == (
        "lbl-dense-capacity_factor-none"
    )
    assert auto_name({"routing.groups": {"a": [0]}}) == "groups-_a_0"


def test_base_file_relative_to_spec_and_inline_sections(tmp_path: Path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"n_experts": 4}, "train": {"steps": 9}}))
    (tmp_path / "studies").mkdir()
    path = tmp_path / "studies" / "mine.yaml"
    # study keys under `study:` and an inline section merged over the base file
    path.write_text(
        yaml.safe_dump({"study": {"base": "../base.yaml", "grid": {"train.seed": [0]}}, "train": {"lr": 1.0}})
    )
    s = load_spec(path)
    assert s.name == "mine" and s.source == path
    cfg = expand(s)[0].cfg
    assert (cfg.model.n_experts, cfg.train.steps, cfg.train.lr) == (4, 9, 1.0)


def test_missing_spec_and_base_are_study_errors(tmp_path: Path):
    with pytest.raises(StudyError, match="unknown study 'nope'.*presets: .*quick"):
        load_spec("nope")
    with pytest.raises(StudyError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    path = tmp_path / "s.yaml"
    path.write_text("base: missing.yaml\ngrid: {train.seed: [0]}\n")
    with pytest.raises(StudyError, match="base config missing.yaml not found"):
        load_spec(path)


@pytest.mark.parametrize(
    "name, n_runs", [("quick", 12), ("scope", 63), ("design-choices", 36), ("scale", 15), ("tiny", 2)]
)
def test_presets_load_and_expand(name: str, n_runs: int, monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)  # presets are found from the package's repository, not only from ./configs
    assert name in preset_names()
    runs = expand(load_spec(name))
    assert len(runs) == n_runs
    assert len({r.name for r in runs}) == n_runs
    for run in runs:  # every skip is an unsupported router/method (not yet implemented), never a bad spec
        assert run.skip is None or "is not allowed" in run.skip, run.skip


def test_quick_preset_is_what_the_issue_asks_for():
    planned = expand(load_spec("quick"))
    assert sorted({r.seed for r in planned}) == [0, 1]  # make demo gives verdicts with intervals: 2 seeds at least
    runs = {r.config: r.cfg for r in planned if r.seed == 0}
    assert set(runs) == {"reference", "lbl-sequence", "lbl-microbatch", "lbl-global", "eb-global", "dense-active"}
    assert runs["reference"].routing.router == "reference"
    assert (runs["eb-global"].balance.method, runs["eb-global"].balance.scope) == ("eb", "global")
    assert runs["dense-active"].model.dense and runs["dense-active"].model.dense_match == "active"
    assert all(c.data.preset == "default" for c in runs.values())


def test_base_by_config_name(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text("base: tiny\ngrid: {train.seed: [0]}\n")
    cfg = expand(load_spec(path))[0].cfg
    assert cfg.data.preset == "tiny" and cfg.model.d_model == 64
