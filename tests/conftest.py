"""Shared fixtures: every test runs offline, on CPU, with the tiny data preset."""

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """The tiny mix, built once per test session into a temporary cache."""
    from moe_testbed.config import DataConfig
    from moe_testbed.data import ensure_mix

    root = tmp_path_factory.mktemp("data")
    os.environ["MOE_TESTBED_DATA"] = str(root)
    mix = ensure_mix(DataConfig(preset="tiny"))
    return Path(mix.path)


@pytest.fixture
def cli_env(tiny_data_dir) -> dict:
    env = dict(os.environ, MOE_TESTBED_DATA=str(os.environ["MOE_TESTBED_DATA"]), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
