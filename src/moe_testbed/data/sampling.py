"""How training rows are drawn from the domains: the packing choices and the domain weights (no torch)."""

from __future__ import annotations

import numpy as np

from moe_testbed.data.errors import DataError

PACKINGS = ("domain", "mixed")  # domain: one domain per row; mixed: whole documents of any domain


def parse_weights(spec: str | None, names: list[str]) -> np.ndarray:
    """Sampling probabilities over ``names`` from a weights option."""
    if spec is None or spec.strip().lower() in ("", "balanced", "uniform", "none"):
        w = np.ones(len(names))
    elif spec.strip().lower().startswith("zipf"):
        _, _, a = spec.partition(":")
        try:
            alpha = float(a) if a else 1.0
        except ValueError:
            raise DataError(f"weights {spec!r}: the zipf exponent must be a number, e.g. zipf:1.2") from None
        w = 1.0 / np.arange(1, len(names) + 1, dtype=np.float64) ** alpha
    else:
        w = np.ones(len(names))
        for item in spec.split(","):
            name, sep, val = item.strip().partition("=")
            if not sep:
                raise DataError(f"weights {spec!r}: use balanced, zipf, zipf:A or name=w,name=w")
            if name not in names:
                raise DataError(f"weights {spec!r}: {name!r} is not a domain of the selection ({', '.join(names)})")
            try:
                w[names.index(name)] = float(val)
            except ValueError:
                raise DataError(f"weights {spec!r}: {val!r} is not a number") from None
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"weights {spec!r} must be non-negative numbers with a positive sum")
    return w / w.sum()
