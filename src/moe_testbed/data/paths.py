"""Where built mixes and downloaded packages live.

The data root is ``$MOE_TESTBED_DATA`` when set, else the user cache directory
(``$XDG_CACHE_HOME/moe-testbed/data`` or ``~/.cache/moe-testbed/data``). A
preset's mix is built into ``<root>/<preset>``; downloaded artifacts and unpacked
Debian packages are shared by every mix under ``<root>/_downloads``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MOE_TESTBED_DATA"


def data_root() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "moe-testbed" / "data"


def preset_dir(preset: str) -> Path:
    return data_root() / preset


def downloads_dir() -> Path:
    return data_root() / "_downloads"
