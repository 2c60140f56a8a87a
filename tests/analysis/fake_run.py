"""A small, valid run directory with synthetic numbers, so analysis tests need no trainer.

The routing counts come from a router that starts out domain-blind and, with
``sharpness`` > 0, concentrates each domain onto a (shuffled) group of experts as
training goes on, like a learned router that specialises.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moe_testbed.config import Config
from moe_testbed.routing.metrics import reference_counts, routing_scalars

DOMAINS = ("python", "english", "html", "german")


def make_fake_run(
    path: str | Path,
    *,
    n_layers: int = 2,
    n_experts: int = 8,
    top_k: int = 2,
    domains: Sequence[str] = DOMAINS,
    steps: int = 200,
    eval_every: int = 100,
    log_every: int = 20,
    tokens_per_step: int = 2048,
    eval_tokens_per_domain: int = 512,
    sharpness: float = 1.0,
    capacity_drop: float = 0.0,
    overrides: dict[str, Any] | None = None,
    status: str = "complete",
    seed: int = 0,
) -> Path:
    """Write config.yaml, metrics.jsonl, routing/step_*.npz and summary.json under ``path``."""
    path = Path(path)
    (path / "routing").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    L, E, C, k = n_layers, n_experts, len(domains), top_k
    layers = [f"L{i}" for i in range(L)]
    _write_config(path, L, E, k, steps, seed, log_every, eval_every, overrides)
    router = _FakeRouter(rng, L, E, C, k, sharpness, capacity_drop)
    lines: list[dict[str, Any]] = []
    prev_counts = np.zeros((L, E, C), dtype=np.int64)
    tokens_LC = np.full((L, C), eval_tokens_per_domain, dtype=np.int64)
    for step in range(0, steps + 1):
        progress = step / max(steps, 1)
        if step % log_every == 0 and step > 0:
            counts, _ = router.route(progress, tokens_per_step // C)
            prev_counts += counts
            loss = 6.0 - 2.0 * progress + rng.normal(0, 0.02)
            line = {"kind": "train", "step": step, "tokens": step * tokens_per_step, "loss": loss, "lr": 3e-3}
            line.update({"tokens_per_s": 5000.0, "grad_norm": 0.5, "aux/lbl": 1.01, "aux/z": 0.0})
            line.update(routing_scalars(counts, layers))
            lines.append(line)
        if step % eval_every == 0 or step == steps:
            counts, drops = router.route(progress, eval_tokens_per_domain)
            slots_LC = counts.sum(axis=1) + drops
            ref = np.stack([reference_counts(slots_LC[l], router.groups, E) for l in range(L)])
            gate = tokens_LC * (0.6 + 0.3 * progress)
            np.savez(
                path / "routing" / f"step_{step:06d}.npz", counts=counts, drops=drops,
                gate_mass_sum=gate.astype(np.float64), tokens=tokens_LC, ref_counts=ref, train_counts=prev_counts,
                layers=np.array(layers), domains=np.array(list(domains)), step=np.array(step), top_k=np.array(k),
            )  # fmt: skip
            prev_counts = np.zeros((L, E, C), dtype=np.int64)
            line = {"kind": "eval", "step": step, "tokens": step * tokens_per_step}
            losses = {d: 5.5 - 1.5 * progress * (1 + 0.2 * i) + 0.1 * sharpness for i, d in enumerate(domains)}
            line["val/loss"] = float(np.mean(list(losses.values())))
            line.update({f"val/loss/{d}": v for d, v in losses.items()})
            line.update({f"val/ppl/{d}": float(np.exp(v)) for d, v in losses.items()})
            line.update(routing_scalars(counts, layers, drops, gate, tokens_LC, ref, prefix="val/"))
            lines.append(line)
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    _write_summary(path, status, steps, tokens_per_step, {k: v for k, v in lines[-1].items() if k.startswith("val/")})
    return path


def _write_config(path: Path, L, E, k, steps, seed, log_every, eval_every, overrides) -> None:
    config = Config().to_dict()
    config["model"].update(n_layers=L, n_experts=E)
    config["routing"]["top_k"] = k
    config["train"].update(steps=steps, seed=seed, log_every=log_every)
    config["eval"]["every"] = eval_every
    config["run"]["name"] = path.name
    for key, value in (overrides or {}).items():
        section, name = key.split(".", 1)
        config[section][name] = value
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


class _FakeRouter:
    """Routes each domain to its reference group (randomly relabelled), sharper as training progresses."""

    def __init__(self, rng, L, E, C, k, sharpness, capacity_drop):
        self.rng, self.L, self.E, self.C, self.k = rng, L, E, C, k
        self.sharpness, self.capacity_drop = sharpness, capacity_drop
        # Reference groups: domain c -> k consecutive experts (overlapping when E < C * k).
        self.groups = [[(c * k + j) % E for j in range(k)] for c in range(C)]
        # The learned router's groups are a random relabelling of the experts.
        self.perm_LE = np.stack([rng.permutation(E) for _ in range(L)])

    def route(self, progress: float, tokens_per_domain: int) -> tuple[np.ndarray, np.ndarray]:
        L, E, C, rng = self.L, self.E, self.C, self.rng
        counts = np.zeros((L, E, C), dtype=np.int64)
        drops = np.zeros((L, C), dtype=np.int64)
        for l in range(L):
            for c in range(C):
                logits = rng.normal(0.0, 0.3, E)
                logits[self.perm_LE[l, self.groups[c]]] += 4.0 * self.sharpness * progress
                p = np.exp(logits) / np.exp(logits).sum()
                slots = tokens_per_domain * self.k
                dropped = rng.binomial(slots, self.capacity_drop) if self.capacity_drop > 0 else 0
                counts[l, :, c] = rng.multinomial(slots - dropped, p)
                drops[l, c] = dropped
        return counts, drops


def _write_summary(path: Path, status: str, steps: int, tokens_per_step: int, final: dict) -> None:
    summary = {
        "status": status, "params_total": 1_000_000, "params_active": 400_000, "tokens": steps * tokens_per_step,
        "steps": steps, "wall_s": 12.5, "tokens_per_s": 5000.0, "final": final, "warnings": [],
    }  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary, indent=2))
