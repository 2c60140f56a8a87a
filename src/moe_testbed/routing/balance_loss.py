"""The load-balancing loss's value over scope units, shared by LBL and the sequence-wise term every method may add.

    f_e = (slots of the unit routed to e) / (T * k),   P_e = mean_t probs[t, e],   value = E * sum_e f_e P_e

over each unit's real tokens (padding excluded); the mean over units that hold any.
"""

from __future__ import annotations

from torch import Tensor

from moe_testbed.routing.scope import unit_counts, unit_sums


def lbl_value(f_E: Tensor, P_E: Tensor, n_experts: int) -> Tensor:
    return n_experts * (f_E * P_E).sum(-1)


def unit_lbl(probs_TE: Tensor, idx_TK: Tensor, valid_T: Tensor | None, unit: int, n_experts: int, k: int) -> Tensor:
    """The mean over units of ``unit`` consecutive tokens of ``E * sum_e f_e P_e`` (1 at uniform load)."""
    T = probs_TE.shape[0]
    v_T = valid_T if valid_T is not None else probs_TE.new_ones(T)
    tokens_U = unit_sums(v_T[:, None], unit)[:, 0]
    n_U = tokens_U.clamp_min(1)
    f_UE = unit_counts(idx_TK, n_experts, unit, v_T) / (n_U[:, None] * k)
    P_UE = unit_sums(probs_TE * v_T[:, None], unit) / n_U[:, None]
    has_U = (tokens_U > 0).float()  # an all-padding unit carries no loss
    return (lbl_value(f_UE, P_UE, n_experts) * has_U).sum() / has_U.sum().clamp_min(1)
