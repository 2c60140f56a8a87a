"""``moe-testbed eval``: a run's checkpoint on its own mix reproduces its last evaluation; other mixes by name."""

from __future__ import annotations

import json

import pytest

from moe_testbed.analysis.evaluate_run import evaluate_run
from moe_testbed.analysis.report import write_report
from moe_testbed.cli import main
from moe_testbed.data.build import build_mix
from moe_testbed.data.plan import BuildOptions
from moe_testbed.errors import ConfigError
from moe_testbed.routing.tables import load_snapshot
from moe_testbed.routing.trace import load_trace
from moe_testbed.train.trainer import run_training
from tests.train.runs import metric_lines, tiny_cfg

RUN = ["train.steps=4", "eval.every=4", "train.checkpoint_every=4", "eval.trace_tokens=512"]


@pytest.fixture(scope="module")
def tiny_run(tiny_data_dir, tmp_path_factory):
    run_dir, _ = run_training(tiny_cfg(tiny_data_dir, *RUN), tmp_path_factory.mktemp("run") / "r", log=lambda *_: None)
    return run_dir


def test_eval_on_the_runs_own_mix_reproduces_its_last_evaluation(tiny_run):
    out = evaluate_run(tiny_run, log=lambda *_: None)
    last = [r for r in metric_lines(tiny_run) if r["kind"] == "eval"][-1]
    got = json.loads((out / "eval.json").read_text())
    for key in ("val/loss", "val/util/mean", "val/purity/mean", "val/specialization/mean"):
        assert got[key] == last[key], key
    trace = load_trace(out / "trace.parquet")
    routed = int(load_snapshot(out / "routing.npz").tables.tokens[0].sum())  # real tokens of the evaluation
    assert trace.token.size == min(65536, routed) and (trace.domain >= 0).all()  # padding is never traced
    assert set(json.loads((out / "analyses.json").read_text())) >= {"syntax_or_topic", "layer_consistency"}
    assert "<h3>expert " in (out / "drilldown.html").read_text()  # the page to browse
    assert (tiny_run / "traces" / "step_000004.parquet").is_file()  # training kept one at its evaluation
    assert load_trace(tiny_run / "traces" / "step_000004.parquet").token.size == 512
    html = write_report([tiny_run], tiny_run / "report").read_text()  # the report shows the trace's analyses
    assert "Token-level routing of 512 validation tokens at step 4" in html and "NMI expert~token class" in html
    page = (tiny_run / "report" / "drilldown.html").read_text()  # the report's drill-down of that trace
    assert "href='drilldown.html'" in html and "at step 4" in page and page.count("<h3>expert ") >= 2


def test_another_mix_with_the_runs_tokenizer_is_evaluated_by_domain_name(tiny_run, tiny_data_dir, tmp_path):
    other = build_mix(BuildOptions(preset="tiny", domains=["sql", "de"], tokenizer_from=str(tiny_data_dir)),
                      out=tmp_path / "other")  # fmt: skip
    out = evaluate_run(tiny_run, data=str(other), out=tmp_path / "eval", log=lambda *_: None)
    got = json.loads((out / "eval.json").read_text())
    assert {k.split("/")[-1] for k in got if k.startswith("val/loss/")} == {"sql", "de"}
    own = json.loads((tiny_run / "eval" / f"{tiny_data_dir.name}-step4" / "eval.json").read_text())
    assert got["val/loss/sql"] == pytest.approx(own["val/loss/sql"])  # the same text, the same model
    assert load_trace(out / "trace.parquet").domains == ["sql", "de"]


def test_a_mix_with_another_tokenizer_is_refused(tiny_run, tmp_path, capsys):
    other = build_mix(BuildOptions(preset="tiny", domains=["sql"], vocab_size=300), out=tmp_path / "other")
    with pytest.raises(ConfigError, match=r"another tokenizer than the run's.*--tokenizer-from"):
        evaluate_run(tiny_run, data=str(other), log=lambda *_: None)
    assert main(["eval", str(tiny_run), "--data", str(other)]) == 2
    assert "error: " in capsys.readouterr().err
