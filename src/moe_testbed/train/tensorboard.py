"""Optional TensorBoard logging of the scalars the trainer writes to metrics.jsonl.

metrics.jsonl stays the record; TensorBoard is a live view of it. When the
tensorboard package is missing the logger warns once and does nothing, so a
config with ``run.tensorboard: true`` never stops a run.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

_warned = False


class ScalarLogger:
    """``ScalarLogger(run_dir, enabled).log(step, scalars)``; event files go to ``run_dir/tb/``."""

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.log_dir = Path(run_dir) / "tb"
        self._writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch raises ImportError when tensorboard is not installed
            _warn_once(f"TensorBoard logging disabled: {exc} (pip install tensorboard)")
            return
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """Write every finite number of ``scalars`` at ``step``; other values are skipped.

        NaN (e.g. a layer without tokens) would draw a gap in some TensorBoard
        versions and an error in others, so it is left out.
        """
        if self._writer is None:
            return
        for tag, value in scalars.items():
            if isinstance(value, str | bytes):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                try:
                    value = float(value)  # numpy scalars, 0-d tensors
                except (TypeError, ValueError):
                    continue
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ScalarLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        _warned = True
