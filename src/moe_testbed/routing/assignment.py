"""Balanced token-to-expert assignment (BASE layers): expert prices, exact repair, auction.

Tensor legend: U scope units (sequences, or one micro-batch), T tokens per unit,
E experts, K experts per token, Q slots per expert (its capacity).

Everything is batched over units and written in tensor operations, with no
Python loop over tokens, so that it runs on the router's device.

Balanced assignment (BASE layers, Lewis et al. 2021) solves the linear program

    max  sum_{t,e} a[t,e] x[t,e]
    s.t. sum_e x[t,e] = K        (every token gets K distinct experts)
         sum_t x[t,e] = c_e      (every expert gets exactly its capacity)
         x[t,e] in {0, 1}

in two stages. First, expert prices p from a damped best-response iteration
on the LP dual (``equilibrium_prices``); top-k of ``a - p`` is then optimal for
the loads it produces, which miss the capacities by a few slots. Second,
either (default, ``solver="repair"``) successive shortest paths on the E x E
expert graph move single slots until the loads are exact, which keeps
optimality (routing/repair.py: the exact optimum), or (``solver="auction"``)
a Jacobi-style forward auction (Bertsekas 1988; objects with several
identical slots, Bertsekas & Castanon 1989) started from those prices: every
token short of K experts bids, for each of the r experts it still needs,
``a[t,e] - v_{r+1} + eps`` (``v_{r+1}``: the value ``a - price`` of its
(r+1)-th best expert not held), and each expert keeps the Q highest prices
among its holders and the bidders. Bids keep eps-complementary slackness, so
the auction ends within ``T*K*eps`` of the optimum whatever the starting
prices. Both are checked against SciPy. When the budget (``max_rounds``
augmentations or rounds) runs out, a greedy completion fills the remaining
free slots, so capacities stay exact (``AuctionResult.completed`` is then False).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_testbed.routing.repair import drop_surplus, shortest_path_repair


def unit_capacities(unit_ids_U: Tensor, unit_tokens: int, top_k: int, n_experts: int) -> Tensor:
    """Slots per expert per unit, long [U, E], each row summing to ``unit_tokens * top_k``.

    When ``T*K`` is not divisible by E, the remainder r goes to r experts that
    rotate with the unit's id (the caller adds the step and the layer), so no
    expert is favoured and a unit gets the same capacities whatever process solves it.
    """
    total = unit_tokens * top_k
    base, rem = divmod(total, n_experts)
    e_E = torch.arange(n_experts, device=unit_ids_U.device)
    extra_UE = ((e_E[None, :] - unit_ids_U[:, None] * rem) % n_experts) < rem
    return base + extra_UE.long()


@dataclass
class AuctionResult:
    idx_UTK: Tensor  # long: the K experts of each token, best score first
    rounds: int  # repair augmentations or auction rounds run
    completed: bool  # False when the greedy completion had to fill slots


@torch.no_grad()
def equilibrium_prices(
    a_UTE: Tensor, top_k: int, cap_UE: Tensor, iters: int, damping: float = 0.7, check_every: int = 2
) -> Tensor:
    """Approximate expert prices p [U, E] with load(top-k of a - p) = capacity.

    A damped best-response (Jacobi) iteration on the LP dual: given the other
    prices, token t takes expert e iff ``a[t,e] - p_e`` beats ``theta[t,e]``, the
    K-th best value among the other experts; so the price that gives e exactly
    c_e tokens lies between the c_e-th and (c_e+1)-th largest ``a[t,e] - theta[t,e]``.
    Every expert moves 70% of the way there at once (damping keeps the Jacobi
    step from oscillating). It is only a warm start: the repair or the auction
    makes the result exact (16-20 iterations leave a few slots to move).
    """
    U, T, E = a_UTE.shape
    K = top_k
    Q = -(-T * K // E)  # ceil: capacities are Q or Q - 1 (unit_capacities); no device sync
    p_UE = a_UTE.new_zeros(U, E)
    if Q >= T or K >= E:
        return p_UE
    # Experts-major layout: every reduction below runs over contiguous memory.
    a_UET = a_UTE.transpose(1, 2).contiguous()
    # The c_e-th and (c_e+1)-th largest of Q+1 values: c_e is Q or Q-1 (the remainder), so they are
    # among the three smallest of an unsorted top-(Q+1) (cheaper than a sorted top-k).
    j_UE1 = (Q - cap_UE)[:, :, None]
    for i in range(iters):
        v_UET = a_UET - p_UE[:, :, None]
        # The K-th and (K+1)-th best values of every token by repeated max (cheaper than a top-k over
        # E; exact ties may merge, which only perturbs this warm start).
        w_UET, best = v_UET, []
        for r in range(K + 1):
            best.append(w_UET.amax(1, keepdim=True))
            if r < K:
                w_UET = w_UET.masked_fill(w_UET >= best[-1], -torch.inf)
        in_top = v_UET >= best[K - 1]
        # Stop once the prices balance the load exactly (one host sync per check_every iterations).
        if check_every and i % check_every == check_every - 1 and bool((in_top.sum(-1) == cap_UE).all()):
            break
        s_UET = a_UET - torch.where(in_top, best[K], best[K - 1])
        low3 = s_UET.topk(Q + 1, dim=-1, sorted=False).values.topk(min(3, Q + 1), dim=-1, largest=False).values
        lo_UE = low3.gather(-1, j_UE1).squeeze(-1)
        hi_UE = low3.gather(-1, (j_UE1 + 1).clamp(max=low3.shape[-1] - 1)).squeeze(-1)
        p_UE = p_UE + damping * (0.5 * (hi_UE + lo_UE) - p_UE)
    return p_UE


@torch.no_grad()
def balanced_assignment(
    score_UTE: Tensor,
    top_k: int,
    cap_UE: Tensor,
    eps: float = 1e-3,
    max_rounds: int = 50,
    price_iters: int = 20,
    solver: str = "repair",
) -> AuctionResult:
    """The balanced assignment above, by price warm start then ``solver`` ("repair" or "auction").

    ``cap_UE`` rows must sum to ``T * top_k`` with entries ``ceil(T*K/E)`` or one less, as
    ``unit_capacities`` makes them. ``max_rounds`` caps the repair's augmentations or the
    auction's rounds; ``eps`` is the auction's bid increment. Auction rounds after the first
    work on the tokens still short of experts only. Host syncs: a few per augmentation or
    round, one per two price iterations (free on CPU, some per layer on CUDA).
    """
    U, T, E = score_UTE.shape
    K, dev = top_k, score_UTE.device
    a = score_UTE.float()
    if K >= E:  # every token takes every expert
        return AuctionResult(torch.arange(E, device=dev).expand(U, T, E).clone(), 0, True)
    Q = -(-T * K // E)
    p0_UE = equilibrium_prices(a, K, cap_UE, price_iters)
    if solver == "repair":
        return _solve_by_repair(a, K, cap_UE, p0_UE, max_rounds)
    # Slots past an expert's capacity are "sold" forever: price +inf, no holder.
    dummy_UEQ = torch.arange(Q, device=dev)[None, None, :] >= cap_UE[:, :, None]
    price_UEQ = torch.where(dummy_UEQ, torch.inf, p0_UE[:, :, None].expand(U, E, Q))
    holder_UEQ = torch.full((U, E, Q), T, dtype=torch.long, device=dev)  # T = nobody
    held_UTE = torch.zeros(U, T, E, dtype=torch.bool, device=dev)
    # A token with no (r+1)-th option pays at most the score range more.
    spread = (a.amax() - a.amin()).clamp_min(1.0) + 1.0
    rank_R = torch.arange(K + 1, device=dev)
    rounds, done = 0, False
    while rounds < max_rounds:
        need_UT = K - held_UTE.sum(-1)
        short_UT = need_UT > 0
        n_bid = int(short_UT.sum(1).max())  # the one host sync of a round
        if n_bid == 0:
            done = True
            break
        # The B = n_bid short tokens of each unit (padded with non-bidders where a unit has fewer).
        is_bidder_UB, tok_UB = short_UT.to(a.dtype).topk(n_bid, dim=1)
        tok_UBE = tok_UB[..., None].expand(U, n_bid, E)
        a_UBE = a.gather(1, tok_UBE)
        need_UB = need_UT.gather(1, tok_UB) * (is_bidder_UB > 0)
        entry_UE = price_UEQ.amin(-1)
        v_UBE = (a_UBE - entry_UE[:, None, :]).masked_fill(held_UTE.gather(1, tok_UBE), -torch.inf)
        vals, inds = v_UBE.topk(K + 1, dim=-1)  # sorted, best first
        # v_{r+1}: the value of the best option beyond the r experts still needed.
        nxt = vals.gather(-1, need_UB.unsqueeze(-1))
        last = vals.gather(-1, (need_UB - 1).clamp(min=0).unsqueeze(-1))
        nxt = torch.where(torch.isfinite(nxt), nxt, last - spread)
        bidding = rank_R[None, None, :] < need_UB[..., None]
        bid_vals = torch.where(bidding, a_UBE.gather(-1, inds) - nxt + eps, -torch.inf)
        bid_UBE = torch.full_like(a_UBE, -torch.inf).scatter_(-1, inds, bid_vals)
        # Each expert keeps the Q highest prices among its holders and the bidders.
        cand_price = torch.cat((price_UEQ, bid_UBE.transpose(1, 2)), dim=-1)
        cand_holder = torch.cat((holder_UEQ, tok_UB[:, None, :].expand(U, E, n_bid)), dim=-1)
        price_UEQ, pos = cand_price.topk(Q, dim=-1, sorted=False)
        holder_UEQ = cand_holder.gather(-1, pos)
        held_UTE = _held(holder_UEQ, U, T, E)
        rounds += 1
    if not done:
        done = bool((held_UTE.sum(-1) == K).all())
        if not done:
            held_UTE = _complete(a, held_UTE, cap_UE, K)
    # Order each token's experts by score, best first (the "first choice" for capacity).
    idx_UTK = a.masked_fill(~held_UTE, -torch.inf).topk(K, dim=-1).indices
    return AuctionResult(idx_UTK=idx_UTK, rounds=rounds, completed=done)


def _solve_by_repair(a_UTE: Tensor, K: int, cap_UE: Tensor, p_UE: Tensor, max_augment: int) -> AuctionResult:
    """Top-k at the warm-start prices, then exact shortest-path repair (routing/repair.py)."""
    idx_UTK = (a_UTE - p_UE[:, None, :]).topk(K, dim=-1).indices
    held_UTE = torch.zeros_like(a_UTE, dtype=torch.bool).scatter_(-1, idx_UTK, True)
    held_UTE, n_aug = shortest_path_repair(a_UTE, held_UTE, cap_UE, max_augment)
    done = bool((held_UTE.sum(1) == cap_UE).all())
    if not done:
        held_UTE = _complete(a_UTE, held_UTE & drop_surplus(a_UTE, held_UTE, cap_UE), cap_UE, K)
    idx_UTK = a_UTE.masked_fill(~held_UTE, -torch.inf).topk(K, dim=-1).indices
    return AuctionResult(idx_UTK=idx_UTK, rounds=n_aug, completed=done)


def _held(holder_UEQ: Tensor, U: int, T: int, E: int) -> Tensor:
    held = torch.zeros(U, T + 1, E, dtype=torch.bool, device=holder_UEQ.device)
    e_UEQ = torch.arange(E, device=holder_UEQ.device)[None, :, None].expand_as(holder_UEQ)
    u_UEQ = torch.arange(U, device=holder_UEQ.device)[:, None, None].expand_as(holder_UEQ)
    held[u_UEQ, holder_UEQ, e_UEQ] = True
    return held[:, :T]


def _complete(a_UTE: Tensor, held_UTE: Tensor, cap_UE: Tensor, K: int) -> Tensor:
    """Fill the free slots greedily: each missing slot takes the best expert with room.

    Rounds of "every short token proposes to its best non-held expert with free
    slots; the expert accepts the highest scores up to its free slots". At most
    T*K rounds, and in practice a handful; it runs only when the solver did
    not finish within ``max_rounds``.
    """
    U, T, E = a_UTE.shape
    free_UE = cap_UE - held_UTE.sum(1)
    for _ in range(T * K):
        need_UT = K - held_UTE.sum(-1)
        if not bool((need_UT > 0).any()):
            break
        ok_UTE = (~held_UTE) & (free_UE[:, None, :] > 0) & (need_UT[..., None] > 0)
        if not bool(ok_UTE.any()):
            # The only free slots are at experts the short tokens already hold: swap through a third token.
            swapped = _swap_once(a_UTE, held_UTE, free_UE, need_UT)
            if swapped is None:
                break  # nothing can move: leave the slot empty (never seen in practice)
            held_UTE, free_UE = swapped
            continue
        choice_UT = a_UTE.masked_fill(~ok_UTE, -torch.inf).argmax(-1)
        proposing_UT = ok_UTE.any(-1)
        prop_UTE = torch.zeros_like(held_UTE).scatter_(-1, choice_UT[..., None], proposing_UT[..., None])
        # Rank proposals per expert by score; accept those within the free slots.
        s_UTE = a_UTE.masked_fill(~prop_UTE, -torch.inf)
        rank_UTE = s_UTE.argsort(dim=1, descending=True).argsort(dim=1)
        accept_UTE = prop_UTE & (rank_UTE < free_UE[:, None, :])
        held_UTE = held_UTE | accept_UTE
        free_UE = free_UE - accept_UTE.sum(1)
    return held_UTE


def _swap_once(a_UTE: Tensor, held_UTE: Tensor, free_UE: Tensor, need_UT: Tensor) -> tuple[Tensor, Tensor] | None:
    """One 2-step augmentation for the first unit stuck: token t moves x -> f (a free expert that the
    short token s holds) and s takes x; the best (t, x) by a[t,f] - a[t,x] + a[s,x]. Rare, so plain."""
    u = int((need_UT > 0).any(-1).nonzero()[0, 0])
    s = int((need_UT[u] > 0).nonzero()[0, 0])
    f = int((free_UE[u] > 0).nonzero()[0, 0])
    a, held = a_UTE[u], held_UTE[u]
    gain_TE = a[:, f, None] - a + a[s][None, :]
    ok_TE = held & ~held[:, f, None] & ~held[s][None, :]
    if not bool(ok_TE.any()):
        return None
    t, x = divmod(int(gain_TE.masked_fill(~ok_TE, -torch.inf).flatten().argmax()), a.shape[1])
    held_UTE = held_UTE.clone()
    held_UTE[u, t, x], held_UTE[u, t, f], held_UTE[u, s, x] = False, True, True
    free_UE = free_UE.clone()
    free_UE[u, f] -= 1
    return held_UTE, free_UE
