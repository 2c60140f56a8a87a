"""`moe-testbed report` on small fake runs: a self-contained HTML page, the PNGs beside it, the results table."""

from __future__ import annotations

import argparse
import base64
import csv
import re

import pytest

from moe_testbed.analysis.cli import register
from moe_testbed.analysis.report import default_out_dir, write_report
from moe_testbed.analysis.rundir import ReportError

from .fake_run import make_fake_run

TINY = {"n_layers": 2, "n_experts": 4, "steps": 40, "eval_every": 20, "log_every": 10}
PER_RUN = ("heatmap_final.png", "curves.png", "expert_load.png", "domain_loss.png")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    sharp = make_fake_run(root / "lbl_global", overrides={"balance.scope": "global"}, sharpness=1.0, **TINY)
    blind = make_fake_run(root / "lbl_seq", overrides={"balance.scope": "sequence"}, sharpness=0.1, **TINY)
    return root, [blind, sharp]


def _parser():
    parser = argparse.ArgumentParser(prog="moe-testbed")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_report_on_two_runs(two_runs, tmp_path):
    root, runs = two_runs
    html_path = write_report(runs, tmp_path / "out", steps=[20])
    assert html_path == tmp_path / "out" / "report.html"
    html = html_path.read_text()

    # Self-contained: images inline, nothing fetched from elsewhere.
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) >= 2 * len(PER_RUN) + 2
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "<script" not in html and "http://" not in html and "https://" not in html

    files = {p.name for p in (tmp_path / "out").iterdir()}
    expected = {"report.html", "results.csv", "scatter.png", "domain_loss_runs.png"}
    expected |= {f"{run}-{name}" for run in ("lbl_global", "lbl_seq") for name in PER_RUN}
    expected |= {"lbl_global-heatmap_step000020.png", "lbl_seq-heatmap_step000020.png"}
    assert files == expected

    # The results table: varied key named, sorted by specialization (the sharper run first).
    assert "<table class='results'>" in html
    assert "Config keys that differ between runs: <code>balance.scope</code>" in html
    assert "tokens trained" in html and "81,920" in html  # 40 steps x 2048 tokens
    with open(tmp_path / "out" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["lbl_global", "lbl_seq"]
    assert [r["balance.scope"] for r in rows] == ["global", "sequence"]
    assert float(rows[0]["specialization"]) > float(rows[1]["specialization"])
    for column in ("val loss", "utilization", "purity", "NMI", "drop rate", "tokens/s"):
        assert column in rows[0]


def test_single_run_report_defaults_to_the_run_dir(tmp_path):
    run = make_fake_run(tmp_path / "solo", **TINY)
    args = _parser().parse_args(["report", str(run)])
    assert args.func(args) == 0
    assert {f"{name}" for name in PER_RUN} <= {p.name for p in run.iterdir()}
    assert "data:image/png;base64," in (run / "report.html").read_text()


def test_cli_options(two_runs, tmp_path, capsys):
    root, runs = two_runs
    args = _parser().parse_args(["report", str(runs[0]), "--out", str(tmp_path / "r"), "--steps", "25, 0"])
    assert args.steps == [25, 0]
    assert args.func(args) == 0
    assert "report.html" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"heatmap_step000020.png", "heatmap_step000000.png"} <= names  # 20: the snapshot nearest to 25
    assert not (runs[0] / "report.html").exists()  # --out respected
    with pytest.raises(SystemExit):
        _parser().parse_args(["report", str(runs[0]), "--steps", "ten"])
    assert default_out_dir(runs) == root.resolve() / "report"


def test_run_without_snapshots_still_reports(tmp_path):
    run = make_fake_run(tmp_path / "early", **TINY)
    for npz in (run / "routing").glob("*.npz"):
        npz.unlink()
    html = write_report([run], run).read_text()
    assert "No routing snapshots" in html
    assert (run / "curves.png").exists() and not (run / "heatmap_final.png").exists()


def test_report_errors(tmp_path):
    (tmp_path / "notarun").mkdir()
    args = _parser().parse_args(["report", str(tmp_path / "notarun")])
    with pytest.raises(ReportError, match="not a run directory"):
        args.func(args)
    with pytest.raises(ReportError, match="no run directories"):
        write_report([], tmp_path)


def test_a_study_report_leads_with_verdicts_and_draws_one_section_per_configuration(tmp_path):
    from moe_testbed.analysis.study_page import StudyOverview

    runs, groups = [], {}
    for config, sharp in (("lbl-global", 1.0), ("lbl-sequence", 0.1)):
        for seed in (0, 1):
            name = f"{config}-s{seed}"
            runs.append(make_fake_run(tmp_path / name, sharpness=sharp, seed=seed, overrides={"run.name": name},
                                      **TINY))  # fmt: skip
            groups.setdefault(config, []).append(name)
    summary = [{"config": c, "seeds": 2, "val/specialization/mean mean": m, "val/specialization/mean low": m - 0.05,
                "val/specialization/mean high": m + 0.05, "val/util/mean mean": 0.9, "val/util/mean low": 0.88,
                "val/util/mean high": 0.92} for c, m in (("lbl-global", 0.6), ("lbl-sequence", 0.1))]  # fmt: skip
    verdicts = [{"claim": "lbl-global > lbl-sequence on specialization", "verdict": "holds", "source": "paper",
                 "effect": {"estimate": 0.5, "low": 0.4, "high": 0.6, "n": 2}}]  # fmt: skip
    overview = StudyOverview("scope", "a test", verdicts, summary, groups)
    html = write_report(runs, tmp_path / "report", overview=overview).read_text()
    assert html.index("Verdicts") < html.index("Per configuration") < html.index("Every run")
    assert "<td class='holds'>holds</td>" in html and "+0.500 [+0.400, +0.600]" in html
    assert "0.600 ± 0.050" in html  # mean ± half-width of the interval
    assert (tmp_path / "report" / "scatter.png").is_file()
    assert (tmp_path / "report" / "curves_by_configuration.png").is_file()
    drawn = sorted(p.name for p in (tmp_path / "report").glob("*heatmap_final.png"))
    assert drawn == ["lbl-global-s0-heatmap_final.png", "lbl-sequence-s0-heatmap_final.png"]  # first seeds only
