"""Typed configuration for every part of the testbed.

One dataclass per section (OLMo-core style). A config is built from YAML plus
dotted command-line overrides (``model.n_experts=16``), validated *before* any
work starts, and written back as resolved YAML into every run directory.

The ``routing`` and ``balance`` sections hold the keys every router and method
shares; a router's or a method's own keys (``balance.eb_rate``,
``routing.noise_std``, ...) are *knobs* declared in that component's file
(moe_testbed/knobs.py) and collected from the registries when a config first
needs them. So adding a method with a knob never touches this package.

Validation raises :class:`ConfigError` with one line naming the key and the
allowed values; the CLI turns it into exit code 2 without a traceback.
"""

from moe_testbed.config.knob_section import KnobSection, section_knobs
from moe_testbed.config.parse import apply_overrides, parse_override
from moe_testbed.config.sections import (
    BalanceConfig,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ParallelConfig,
    RoutingConfig,
    RunConfig,
    TrainConfig,
    load_config,
)
from moe_testbed.errors import ConfigError

__all__ = [
    "BalanceConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "KnobSection", "ModelConfig",
    "ParallelConfig", "RoutingConfig", "RunConfig", "TrainConfig", "apply_overrides", "load_config",
    "parse_override", "section_knobs",
]  # fmt: skip
