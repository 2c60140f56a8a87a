"""What a checkpoint holds besides the weights, and how every rank resumes from it.

Rank 0 writes the checkpoint, so what is per rank must reach it first: every
rank's RNG state (router noise differs between ranks) is gathered, and the
statistics not yet logged (routing counts, loss sums) are folded into rank 0,
their sum over ranks unchanged, so a resumed run logs what an uninterrupted
one would.
"""

from __future__ import annotations

import time

import torch


class RunState:
    """Mixed into the Trainer: checkpoint state of the optimizer, data order, RNG, statistics, routers."""

    @staticmethod
    def _rng_state() -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return rng

    def fold_partial_stats(self) -> None:
        """Move every rank's not-yet-logged statistics to rank 0 (a collective; sums unchanged)."""
        if self.world_size == 1:
            return
        w = self.window
        partial = {"loss": torch.as_tensor(w["loss"]), **{k: torch.as_tensor(v) for k, v in w["aux"].items()}}
        totals = self.dp.sum({**{f"rec/{k}": v for k, v in self.recorder.state_dict().items()}, **partial})
        if self.rank == 0:
            self.recorder.load_state_dict({k[4:]: v for k, v in totals.items() if k.startswith("rec/")})
            w["loss"], w["aux"] = totals["loss"], {k: totals[k] for k in w["aux"]}
        else:
            self.recorder.reset()
            w["loss"], w["aux"] = 0.0 * totals["loss"], {k: 0.0 * totals[k] for k in w["aux"]}

    def state_dict(self, rng_ranks: list[dict] | None = None) -> dict:
        """The run's state besides the weights; ``rng_ranks``: every rank's RNG state, in rank order."""
        rng_ranks = rng_ranks or [self._rng_state()]
        return {
            "step": self.step,
            "tokens": self.tokens,
            "timing": {"train_time": self.train_time, "train_tokens": self.train_tokens, "wall": self._wall()},
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,
            "loader": self.loader.state_dict(),
            "recorder": self.recorder.state_dict(),
            "since_eval": self.since_eval,
            "window": {
                **self.window,
                "loss": float(self.window["loss"]),
                "aux": {k: float(v) for k, v in self.window["aux"].items()},
            },
            "routers": {i: layer.router.state_dict() for i, layer in enumerate(self.model.moe_layers)},
            "router_extra": {
                i: getattr(layer.router, "extra_state", lambda: None)() for i, layer in enumerate(self.model.moe_layers)
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        timing = state.get("timing", {})
        self.train_time, self.train_tokens = timing.get("train_time", 0.0), timing.get("train_tokens", 0)
        # Wall time counts the work before the kill too (not the time the run was dead).
        self.wall_start = time.time() - timing.get("wall", 0.0)
        self.optimizer.load_state_dict(state["optimizer"])
        rng_ranks = state.get("rng_ranks", [state["rng"]])
        if self.rank < len(rng_ranks) and len(rng_ranks) == self.world_size:
            rng = rng_ranks[self.rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:  # resumed on another number of ranks: fresh, still seeded, router noise
            torch.manual_seed(self.dp.rank_seed(self.cfg.train.seed + self.step))
        self.loader.load_state_dict(state["loader"])
        self.recorder.load_state_dict(state["recorder"])
        self.since_eval = state["since_eval"]
        self.window = state["window"]
        if self.rank > 0:  # rank 0's statistics are every rank's (fold_partial_stats)
            self.recorder.reset()
            self.window = {**self.window, "loss": 0.0, "aux": {k: 0.0 for k in self.window["aux"]}}
        for i, layer in enumerate(self.model.moe_layers):
            extra = state.get("router_extra", {}).get(i)
            if extra is not None and hasattr(layer.router, "load_extra_state"):
                layer.router.load_extra_state(extra)
            # A router frozen at step N must stay frozen after resume.
            if hasattr(layer.router, "sync_after_resume"):
                layer.router.sync_after_resume(self.step)
