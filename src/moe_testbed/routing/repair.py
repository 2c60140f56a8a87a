"""Exact repair of a price-based assignment to the expert capacities (successive shortest paths).

Tensor legend: U scope units, T tokens per unit, E experts, K experts per token.

Given expert prices p, the assignment ``x = top-k_e(a[t] - p)`` is optimal for the
loads it produces (LP duality: p certifies it). Usually those loads miss the
capacities by a few slots. Min-cost-flow theory fixes the rest exactly: moving
one slot along a *shortest* path from an over-full to an under-full expert in
the residual graph keeps the assignment optimal for its new loads
(successive shortest paths, Ford & Fulkerson; Busacker & Gowen 1961). With only
E experts the residual graph is small:

    edge i -> j   move one token that holds i and not j from i to j
    cost(i, j)    = min over such tokens of a[t, i] - a[t, j]     (the score lost)

Each augmentation computes all-pairs shortest paths on the E x E cost matrix
(log2 E min-plus squarings), moves one slot along the cheapest path from an
over-full to an under-full expert (one token per edge), and repeats until
every expert holds exactly its capacity. The result is the exact optimum of the balanced assignment (up
to float ties); a test checks it against SciPy. The cost of one augmentation
is a few operations on a [U, E, T*K/E, E] tensor (each expert's holders) plus a host
read of the path.
"""

from __future__ import annotations

import torch
from torch import Tensor

TIE_TOL = 1e-6  # relative to the largest |score| of the unit; float32 rounding is ~6e-8 per operation


@torch.no_grad()
def shortest_path_repair(a_UTE: Tensor, held_UTE: Tensor, cap_UE: Tensor, max_augment: int) -> tuple[Tensor, int]:
    """Move slots along shortest paths until the loads equal ``cap_UE``; returns (held, augmentations).

    Stops early, with loads still off, after ``max_augment`` augmentations or when no path can be
    traced (a float-rounding cycle); the caller then completes greedily.
    """
    U, T, E = a_UTE.shape
    dev = a_UTE.device
    held = held_UTE.clone()
    # Improvements below float32 rounding of the scores are not improvements: taken, they make
    # zero-cost cycles look negative, and the split table then refers back to itself. Ignoring
    # them keeps every path within n_hops * tol of the shortest.
    tol_U11 = TIE_TOL * a_UTE.detach().abs().amax(dim=(1, 2)).clamp_min(1.0)[:, None, None]
    n_hops = max(1, (E - 1).bit_length())  # min-plus squarings: paths of up to 2^n_hops >= E - 1 edges
    for n_aug in range(max_augment):
        load_UE = held.sum(1)
        surplus_UE, deficit_UE = load_UE > cap_UE, load_UE < cap_UE
        if not bool(surplus_UE.any()):  # host syncs: about three per augmentation
            return held, n_aug
        cost_UEE, tok_UEE = edge_costs(a_UTE, held, int(load_UE.max()))
        # All-pairs shortest paths by min-plus squaring; via[i, j] = k records the split of i -> j.
        dist_UEE = cost_UEE.clone()
        dist_UEE.diagonal(dim1=1, dim2=2).fill_(0.0)
        via_UEE = torch.full((U, E, E), -1, dtype=torch.long, device=dev)
        for _ in range(n_hops):
            best, k = (dist_UEE[:, :, :, None] + dist_UEE[:, None, :, :]).min(dim=2)
            better = best < dist_UEE - tol_U11
            dist_UEE = torch.where(better, best, dist_UEE)
            via_UEE = torch.where(better, k, via_UEE)
        pair_UEE = dist_UEE.masked_fill(~(surplus_UE[:, :, None] & deficit_UE[:, None, :]), torch.inf)
        best_U, flat_U = pair_UEE.flatten(1).min(-1)
        # Trace on the host (E nodes per unit at most) and collect the moves.
        via, tok = via_UEE.tolist(), tok_UEE.tolist()
        moves: list[tuple[int, int, int, int]] = []  # (unit, token, from, to)
        for u, (d, flat) in enumerate(zip(best_U.tolist(), flat_U.tolist())):
            if d == float("inf"):
                continue
            edges = _trace(via[u], flat // E, flat % E, E)
            if edges is not None:
                moves += [(u, tok[u][i][j], i, j) for i, j in edges]
        if not moves:
            return held, n_aug
        u_M, t_M, i_M, j_M = (torch.tensor(col, device=dev) for col in zip(*moves))
        held[u_M, t_M, i_M] = False
        held[u_M, t_M, j_M] = True
    return held, max_augment


def edge_costs(a_UTE: Tensor, held_UTE: Tensor, max_load: int) -> tuple[Tensor, Tensor]:
    """Residual edge costs [U, E, E] and the token realising each (inf where no token can move).

    Only the holders of expert i can move out of i, and an expert holds about T*K/E tokens, so
    the minimum runs over each expert's holders ([U, E, L, E] with L the largest load), not over
    all T tokens ([U, E, E, T]): about E/K times less work.
    """
    U, T, E = a_UTE.shape
    is_holder_UEL, hold_UEL = held_UTE.transpose(1, 2).to(a_UTE.dtype).topk(max_load, dim=-1)
    # Row indexing of the flattened [U*T, E] tables (a plain row copy, faster than gather).
    rows = (hold_UEL + torch.arange(U, device=a_UTE.device)[:, None, None] * T).reshape(-1)
    a_UELE = a_UTE.reshape(U * T, E)[rows].view(U, E, max_load, E)  # scores of expert i's holders
    held_UELE = held_UTE.reshape(U * T, E)[rows].view(U, E, max_load, E)
    own_UEL = a_UELE.diagonal(dim1=1, dim2=3).transpose(1, 2)  # a[t, i] of each holder t of i
    loss_UELE = own_UEL[..., None] - a_UELE  # moving t's slot from i to j loses a[t, i] - a[t, j]
    ok_UELE = (is_holder_UEL > 0)[..., None] & ~held_UELE
    cost_UEE, l_UEE = loss_UELE.masked_fill(~ok_UELE, torch.inf).min(dim=2)
    return cost_UEE, hold_UEL.gather(2, l_UEE)


def _trace(via: list[list[int]], i: int, j: int, E: int) -> list[tuple[int, int]] | None:
    """The edges of the shortest path i -> j from the split table; None if it does not unfold simply.

    A negative cycle (float rounding, or a start that is not quite optimal) makes the table
    refer back to itself (``via[a][b] == b`` after a negative diagonal, or two splits that name
    each other); unfolding it would never end, so every split is counted and bounded.
    """
    edges, stack, splits = [], [(i, j)], 0
    while stack:
        a, b = stack.pop()
        k = via[a][b]
        if k < 0:
            edges.append((a, b))
        elif k in (a, b) or splits >= E:  # a simple path has at most E - 2 splits
            return None
        else:
            splits += 1
            stack += [(k, b), (a, k)]  # unfold a -> k first
        if len(edges) > E:
            return None
    nodes = [i] + [b for _, b in edges]
    return edges if len(set(nodes)) == len(nodes) else None


def drop_surplus(a_UTE: Tensor, held_UTE: Tensor, cap_UE: Tensor) -> Tensor:
    """Release the lowest-scoring slots of every over-full expert so that no load exceeds its capacity."""
    over_UE = (held_UTE.sum(1) - cap_UE).clamp_min(0)
    s_UTE = a_UTE.masked_fill(~held_UTE, torch.inf)
    rank_UTE = s_UTE.argsort(dim=1).argsort(dim=1)  # 0 = the expert's lowest-scoring holder
    return held_UTE & ~(rank_UTE < over_UE[:, None, :])
