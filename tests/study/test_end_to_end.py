"""The tiny study preset for real: two short training runs in two workers, the table and the report."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest

from moe_testbed.study.runner import run_study

from .helpers import table

pytestmark = pytest.mark.slow
OVERRIDES = ["train.steps=4", "train.log_every=2", "train.checkpoint_every=2", "eval.every=2"]


def _has_report() -> bool:
    try:
        import moe_testbed.analysis.report  # noqa: F401
    except ImportError:
        return False
    return True


def test_tiny_study_end_to_end(tiny_data_dir: Path, tmp_path: Path):
    out = tmp_path / "study"
    stream = io.StringIO()
    code = run_study("tiny", out=out, workers=2, overrides=OVERRIDES, progress="log", stream=stream)
    text = stream.getvalue()
    assert code == 0, text
    rows = table(out)
    assert list(rows) == ["lbl-microbatch", "lbl-global"]
    domain_losses = [k for k in rows["lbl-global"] if k.startswith("val/loss/")]
    assert len(domain_losses) >= 2
    for name, row in rows.items():
        assert row["status"] == "complete", row
        assert row["balance.scope"] == name.removeprefix("lbl-")
        assert row["steps"] == 4 and row["tokens_per_s"] > 0 and row["wall_s"] > 0
        assert math.isfinite(row["val/loss"]) and all(math.isfinite(row[k]) for k in domain_losses)
        assert 0 < row["val/util/mean"] <= 1 and 0 < row["val/purity/mean"] <= 1
        assert 0 <= row["val/nmi/mean"] <= 1 and row["val/drop_rate/mean"] == 0
        assert "val/specialization/mean" in row
        run_dir = out / row["run_dir"]
        assert (run_dir / "summary.json").is_file() and list((run_dir / "routing").glob("step_*.npz"))
    with open(out / "results.csv") as fh:
        assert [r["name"] for r in csv.DictReader(fh)] == ["lbl-microbatch", "lbl-global"]
    if _has_report():
        assert (out / "report" / "report.html").is_file(), text
    else:
        assert "report    skipped" in text

    stream = io.StringIO()  # the same command again trains nothing
    assert run_study("tiny", out=out, workers=2, overrides=OVERRIDES, stream=stream) == 0
    text = stream.getvalue()
    assert "2 runs already complete" in text and "start" not in text
    if _has_report():
        assert "report.html (up to date)" in text
    assert table(out).keys() == rows.keys()
