"""The training run's own state (counters, the log window, statistics not yet written) and its checkpoint form.

Rank 0 writes the checkpoint, so what is per rank must reach it first: every
rank's RNG state (router noise differs between ranks) is gathered, and the
statistics not yet logged (routing counts, loss sums) are folded into rank 0,
their sum over ranks unchanged, so a resumed run logs what an uninterrupted
one would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class LogWindow:
    """Sums since the last training log line (device tensors: no host sync per step)."""

    loss: Any = 0.0
    aux: dict[str, Any] = field(default_factory=dict)
    n: int = 0  # optimizer steps
    tokens: int = 0
    time: float = 0.0

    def state_dict(self) -> dict:
        return {"loss": float(self.loss), "aux": {k: float(v) for k, v in self.aux.items()}, "n": self.n,
                "tokens": self.tokens, "time": self.time}  # fmt: skip

    @classmethod
    def from_state_dict(cls, d: dict) -> LogWindow:
        return cls(d["loss"], dict(d["aux"]), d["n"], d["tokens"], d["time"])


@dataclass
class TrainState:
    """Counters of one run; the trainer owns one, checkpoints hold it (see :func:`checkpoint_payload`)."""

    since_eval: np.ndarray  # [L, E, C] training slot counts since the last evaluation
    step: int = 0
    tokens: int = 0  # training tokens over all ranks
    train_time: float = 0.0  # this process's measured step time (throughput)
    train_tokens: int = 0
    wall_start: float = field(default_factory=time.time)
    window: LogWindow = field(default_factory=LogWindow)
    microbatches: int = 0  # micro-batches trained on this rank, and their distinct domains summed
    microbatch_domains: int = 0
    # Routing means of the last training log (drops happen in training: evaluation is
    # dropless unless balance.eval_capacity_factor is set); summary.json carries them.
    train_routing: dict[str, float] = field(default_factory=dict)

    def wall(self) -> float:
        return time.time() - self.wall_start


def rng_state() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def checkpoint_payload(state: TrainState, optimizer, loader, recorder, model, rng_ranks: list[dict]) -> dict:
    """Everything a resume needs besides the weights; ``rng_ranks``: every rank's RNG state, in rank order."""
    return {
        "step": state.step,
        "tokens": state.tokens,
        "timing": {"train_time": state.train_time, "train_tokens": state.train_tokens, "wall": state.wall()},
        "mixing": {"microbatches": state.microbatches, "microbatch_domains": state.microbatch_domains},
        "optimizer": optimizer.state_dict(),
        "rng": rng_ranks[0],
        "rng_ranks": rng_ranks,
        "loader": loader.state_dict(),
        "recorder": recorder.state_dict(),
        "since_eval": state.since_eval,
        "window": state.window.state_dict(),
        "routers": {i: layer.router.state_dict() for i, layer in enumerate(model.moe_layers)},
    }


def restore(payload: dict, state: TrainState, optimizer, loader, recorder, model, dp, seed: int) -> None:
    """Load ``payload`` into the run's objects on this rank (the inverse of :func:`checkpoint_payload`)."""
    state.step, state.tokens = payload["step"], payload["tokens"]
    timing = payload.get("timing", {})
    state.train_time, state.train_tokens = timing.get("train_time", 0.0), timing.get("train_tokens", 0)
    # Wall time counts the work before the kill too (not the time the run was dead).
    state.wall_start = time.time() - timing.get("wall", 0.0)
    mixing = payload.get("mixing", {})
    state.microbatches, state.microbatch_domains = mixing.get("microbatches", 0), mixing.get("microbatch_domains", 0)
    optimizer.load_state_dict(payload["optimizer"])
    rng_ranks = payload.get("rng_ranks", [payload["rng"]])
    if dp.rank < len(rng_ranks) and len(rng_ranks) == dp.world_size:
        rng = rng_ranks[dp.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # resumed on another number of ranks: fresh, still seeded, router noise
        torch.manual_seed(dp.rank_seed(seed + state.step))
    loader.load_state_dict(payload["loader"])
    recorder.load_state_dict(payload["recorder"])
    state.since_eval = payload["since_eval"]
    state.window = LogWindow.from_state_dict(payload["window"])
    if dp.rank > 0:  # rank 0's statistics are every rank's (fold_partial_stats)
        recorder.reset()
        state.window = LogWindow(aux={k: 0.0 for k in state.window.aux}, n=state.window.n,
                                 tokens=state.window.tokens, time=state.window.time)  # fmt: skip
    for layer in model.moe_layers:  # a router frozen at step N must stay frozen after resume
        layer.router.sync_after_resume(state.step)


def fold_partial_stats(state: TrainState, recorder, dp) -> None:
    """Move every rank's not-yet-logged statistics to rank 0 (a collective; sums unchanged)."""
    if dp.world_size == 1:
        return
    w = state.window
    partial = {"loss": torch.as_tensor(w.loss), **{k: torch.as_tensor(v) for k, v in w.aux.items()}}
    totals = dp.sum({**{f"rec/{k}": v for k, v in recorder.state_dict().items()}, **partial})
    if dp.rank == 0:
        recorder.load_state_dict({k[4:]: v for k, v in totals.items() if k.startswith("rec/")})
        w.loss, w.aux = totals["loss"], {k: totals[k] for k in w.aux}
    else:
        recorder.reset()
        w.loss, w.aux = 0.0 * totals["loss"], {k: 0.0 * totals[k] for k in w.aux}
