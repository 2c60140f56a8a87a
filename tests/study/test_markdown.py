"""study/markdown.py: the verdict and summary tables as Markdown."""

import math

from moe_testbed.study.markdown import tables_markdown


def test_tables_show_verdicts_and_means_with_intervals():
    summary = [
        {"config": "a", "seeds": 3, "val/loss mean": 5.0, "val/loss low": 4.9, "val/loss high": 5.1,
         "train/drop_rate/mean mean": 0.0, "train/drop_rate/mean low": 0.0, "train/drop_rate/mean high": 0.0},
        {"config": "dense", "seeds": 1, "val/loss mean": 6.25, "val/loss low": math.nan, "val/loss high": math.nan,
         "val/purity/mean mean": math.nan},
    ]  # fmt: skip
    verdicts = [{"claim": "a > b on loss", "verdict": "holds", "source": "paper",
                 "effect": {"estimate": 0.25, "low": 0.125, "high": 0.375}},
                {"claim": "a ~ b on loss within 0.1", "verdict": "n/a", "effect": None}]  # fmt: skip
    lines = tables_markdown("s", summary, verdicts).splitlines()
    assert "| a > b on loss | holds | +0.25 [+0.125, +0.375] | paper |" in lines
    assert "| a ~ b on loss within 0.1 | n/a | - |  |" in lines
    assert "| configuration | seeds | val loss |" in lines  # no purity (none finite), no all-zero drop rate
    assert "| a | 3 | 5.000 [4.900, 5.100] |" in lines
    assert "| dense | 1 | 6.250 |" in lines  # one seed: the value, no interval
