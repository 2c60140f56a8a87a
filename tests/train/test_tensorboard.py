"""ScalarLogger: event files under run_dir/tb when enabled, silence (one warning) without tensorboard."""

from __future__ import annotations

import math
import sys

import pytest

from moe_testbed.train import tensorboard as tb


def test_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = tb.ScalarLogger(tmp_path, enabled=True)
    assert logger.enabled
    logger.log(10, {"loss": 3.5, "util/L0": 0.9, "purity/L0": math.nan, "note": "text"})
    logger.log(20, {"loss": 3.0})
    logger.close()
    logger.close()  # idempotent

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "util/L0"}  # NaN and text skipped
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("loss")] == [(10, 3.5), (20, 3.0)]


def test_disabled_writes_nothing(tmp_path):
    logger = tb.ScalarLogger(tmp_path, enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not logger.enabled
    assert not (tmp_path / "tb").exists()


def test_missing_tensorboard_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    monkeypatch.setattr(tb, "_warned", False)
    with pytest.warns(RuntimeWarning, match="TensorBoard logging disabled"):
        logger = tb.ScalarLogger(tmp_path, enabled=True)
    assert not logger.enabled
    logger.log(1, {"loss": 1.0})  # a no-op, not an error
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tb.ScalarLogger(tmp_path, enabled=True)  # second time: silent
