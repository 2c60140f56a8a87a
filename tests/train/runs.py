"""Helpers for tests that train tiny runs and compare their outputs."""

import json
from pathlib import Path

from safetensors.torch import load_file

from moe_testbed.config import load_config

REPO = Path(__file__).resolve().parents[2]
TIMING_KEYS = {"tokens_per_s"}


def tiny_cfg(data_dir, *overrides):
    return load_config(
        REPO / "configs/tiny.yaml", [f"data.dir={data_dir}", "run.progress=none", "train.threads=1", *overrides]
    )


def final_weights(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return load_file(ckpts[-1] / "model.safetensors")


def metric_lines(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in rec.items() if k not in TIMING_KEYS} for rec in lines]
