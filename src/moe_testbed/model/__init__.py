"""Decoder-only MoE language model (single-device; parallelism is applied from outside)."""

from moe_testbed.model.params import count_params, dense_hidden_for
from moe_testbed.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer", "count_params", "dense_hidden_for"]
