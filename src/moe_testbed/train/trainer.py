"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, live routing stats.

Determinism: everything random (init, router noise, data order) derives from
``train.seed``; the data loader is a pure function of the batch index and the
checkpoint holds the RNG state, so a run killed at any moment and resumed ends
with the same weights as an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moe_testbed.allocator import keep_freed_memory
from moe_testbed.analysis.metrics import routing_scalars
from moe_testbed.analysis.tensorboard import ScalarLogger
from moe_testbed.config import Config
from moe_testbed.data import ensure_mix
from moe_testbed.io import atomic_write, atomic_write_json, atomic_write_text
from moe_testbed.model import Transformer, count_params
from moe_testbed.model.transformer import moe_layer_indices
from moe_testbed.routing.base import RoutingContext
from moe_testbed.routing.groups import describe_groups, reference_groups
from moe_testbed.routing.registry import ROUTERS
from moe_testbed.routing.stats import RoutingRecorder
from moe_testbed.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moe_testbed.train.distributed import DataParallel, init_data_parallel
from moe_testbed.train.evaluate import evaluate
from moe_testbed.train.progress import Progress
from moe_testbed.train.run_state import RunState
from moe_testbed.train.schedule import lr_at
from moe_testbed.train.setup import autocast_for, build_optimizer, default_run_name


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


TRAIN_ROUTING_KEYS = ("drop_rate/mean", "util/mean", "purity/mean")


class Trainer(RunState):
    def __init__(self, cfg: Config, run_dir: Path, dp: DataParallel | None = None, log=print):
        """``dp``: this process's place in a data-parallel run (distributed.py); None = alone."""
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log
        t = cfg.train
        self.dp = dp or init_data_parallel(t.device)
        self.rank, self.world_size, self.group = self.dp.rank, self.dp.world_size, self.dp.group
        self.accum = self.dp.local_accumulation(t.grad_accum)
        if t.threads:
            torch.set_num_threads(t.threads)
        keep_freed_memory()  # see allocator.py: fewer page faults per step on CPU
        self.device = self.dp.device
        self.autocast = autocast_for(self.device, t.dtype)
        self.mix = ensure_mix(cfg.data)
        self.domains = self.mix.domains
        self.train_domains = cfg.data.domains or self.domains
        torch.manual_seed(t.seed)
        info = {
            "domains": self.domains,
            "token_frequencies": self.mix.token_frequencies,
            "vocab_size": self.mix.vocab_size,
        }
        self.groups = reference_groups(self.domains, cfg.model.n_experts, cfg.routing.top_k, cfg.routing.groups)
        info["groups"] = self.groups
        self.model = Transformer(cfg, self.mix.vocab_size, info).to(self.device)
        self.dp.broadcast_model(self.model)
        if self.world_size > 1:  # same weights everywhere, but each rank its own router noise
            torch.manual_seed(self.dp.rank_seed(t.seed))
        self.optimizer = build_optimizer(self.model, cfg)
        self.loader = self.mix.train_loader(
            cfg.data.seq_len, t.micro_batch_size, t.seed, packing=cfg.data.packing, weights=cfg.data.weights,
            domains=cfg.data.domains, rank=self.rank, world_size=self.world_size,
        )  # fmt: skip
        self.val_batches = self.mix.val_batches(
            cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.tokens_per_domain, cfg.data.domains
        )
        n_moe = len(moe_layer_indices(cfg))
        self.recorder = RoutingRecorder(max(n_moe, 1), cfg.model.n_experts, len(self.domains), self.device)
        self.since_eval = np.zeros((max(n_moe, 1), cfg.model.n_experts, len(self.domains)), dtype=np.int64)
        self.step = 0
        self.tokens = 0
        self.window = self._empty_window()
        # Routing means of the last training log (drops happen in training: evaluation is
        # dropless unless balance.eval_capacity_factor is set); summary.json carries them.
        self.train_routing: dict[str, float] = {}
        self.train_time, self.train_tokens = 0.0, 0  # this process's measured throughput
        self.params = count_params(self.model)
        self.warnings: list[str] = []
        if not cfg.model.dense and not ROUTERS[cfg.routing.router].causal:
            self.warnings.append(
                f"routing.router={cfg.routing.router} is not causal: a token's expert depends on other tokens of the "
                "batch, which a causal LM cannot see at inference; compare its loss with care"
            )
        self.wall_start = time.time()

    def _wall(self) -> float:
        return time.time() - self.wall_start

    @staticmethod
    def _empty_window() -> dict:
        return {"loss": 0.0, "aux": {}, "n": 0, "tokens": 0, "time": 0.0}

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        state = load_checkpoint(ckpt, self.model)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.load_state_dict(state)
        if self.rank == 0:
            self._truncate_metrics(self.step)
        self.log(f"resumed {self.run_dir} from {ckpt.name} (step {self.step})")
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint (and a torn last line)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                break
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    # -- logging --------------------------------------------------------------
    def _write_metrics(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.scalar_logger.log(record["step"], {k: v for k, v in record.items() if isinstance(v, (int, float))})

    def _write_summary(self, status: str, final: dict | None = None) -> None:
        if self.rank != 0:
            return
        wall = self._wall()
        atomic_write_json(
            self.run_dir / "summary.json",
            {
                "status": status,
                "params_total": self.params["total"],
                "params_active": self.params["active"],
                "params_embedding": self.params["embedding"],
                "tokens": self.tokens,
                "steps": self.step,
                "world_size": self.world_size,
                "wall_s": round(wall, 2),
                "tokens_per_s": round(self.train_tokens / max(self.train_time, 1e-9), 1),
                "final": final or {},
                "train_routing": self.train_routing,
                "warnings": self.warnings,
                "reference_groups": {d: g for d, g in zip(self.domains, self.groups)},
                "moe_layers": self.model.moe_layer_names,
            },
        )

    def _log_step(self, lr: float, grad_norm: float) -> None:
        w = self.window
        # Means over ranks: every rank logs (and rank 0 writes) the numbers of the whole run.
        sums = self.dp.sum({"loss": torch.as_tensor(w["loss"]), **{k: torch.as_tensor(v) for k, v in w["aux"].items()}})
        w["loss"] = sums.pop("loss") / self.world_size
        w["aux"] = {k: v / self.world_size for k, v in sums.items()}
        loss = float(w["loss"]) / max(w["n"], 1)
        record = {"kind": "train", "step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr}
        record["grad_norm"] = grad_norm
        record["tokens_per_s"] = w["tokens"] / max(w["time"], 1e-9)
        for kind, value in w["aux"].items():
            record[f"aux/{kind}"] = float(value) / max(w["n"], 1)
        self.train_time += w["time"]
        self.train_tokens += w["tokens"]
        if self.model.moe_layers and self.cfg.train.routing_stats:
            t = {k: v.numpy() for k, v in self.dp.sum(self.recorder.tables()).items()}
            self.since_eval += t["counts"]
            record.update(
                routing_scalars(
                    t["counts"], self.model.moe_layer_names, drops_LD=t["drops"],
                    gate_mass_sum_LD=t["gate_mass_sum"], tokens_LD=t["tokens"],
                )
            )  # fmt: skip
            self.recorder.reset()
            self.train_routing = {f"train/{k}": record[k] for k in TRAIN_ROUTING_KEYS if k in record}
        self._write_metrics(record)
        self.progress.update(self.step, record)
        self.window = self._empty_window()

    def _evaluate(self) -> dict:
        scalars, arrays = evaluate(
            self.model, self.val_batches, self.domains, self.groups, self.cfg, self.device, self.autocast, self.dp
        )
        record = {"kind": "eval", "step": self.step, "tokens": self.tokens, **scalars}
        self._write_metrics(record)
        if arrays and self.rank == 0:
            path = self.run_dir / "routing" / f"step_{self.step:06d}.npz"
            path.parent.mkdir(exist_ok=True)
            payload = dict(
                arrays,
                train_counts=self.since_eval,
                layers=np.array(self.model.moe_layer_names),
                domains=np.array(self.domains),
                step=np.array(self.step),
                top_k=np.array(self.cfg.routing.top_k),
            )
            atomic_write(path, lambda p: _savez(p, payload))
            self.since_eval = np.zeros_like(self.since_eval)
        self.progress.note(f"eval step {self.step}: val loss {scalars['val/loss']:.3f}")
        return record

    # -- the loop -------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.scalar_logger = ScalarLogger(self.run_dir, cfg.run.tensorboard and self.rank == 0)
        self.progress = Progress(t.steps, cfg.run.progress, enabled=self.rank == 0, start=self.step)
        self._write_summary("running")
        V = self.mix.vocab_size
        final: dict = {}
        try:
            self.model.train()
            while self.step < t.steps:
                lr = lr_at(self.step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                t0 = time.perf_counter()
                loss_acc = torch.zeros((), device=self.device)
                aux_acc: dict[str, torch.Tensor] = {}
                for mb in range(self.accum):
                    inp, tgt, dom = (x.to(self.device, non_blocking=True) for x in self.loader.next_batch())
                    ctx = RoutingContext(
                        training=True, seq_len=inp.shape[1], domain_ids_T=dom.reshape(-1), step=self.step,
                        microbatch=mb, tokens_in_step=inp.numel() * self.accum, group=self.group,
                        recorder=self.recorder if t.routing_stats else None, capacity_factor=cfg.balance.capacity_factor,
                    )  # fmt: skip
                    with self.autocast():
                        out = self.model(inp, ctx)
                    ce = F.cross_entropy(out.logits.float().view(-1, V), tgt.reshape(-1), ignore_index=-100)
                    ((ce + out.aux_loss) / self.accum).backward()
                    loss_acc += ce.detach() / self.accum
                    for kind, value in out.aux.items():
                        aux_acc[kind] = aux_acc.get(kind, 0.0) + value / self.accum
                    self.tokens += inp.numel() * self.world_size
                self.dp.average_gradients(list(self.model.parameters()))
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.model.after_optimizer_step(self.step)
                log_now = self.step % t.log_every == 0 or self.step == t.steps
                # Sums stay on the device; .item() happens only on log steps,
                # so there is no host sync per micro-batch.
                w = self.window
                w["n"] += 1
                w["loss"] = w["loss"] + loss_acc
                for kind, value in aux_acc.items():
                    w["aux"][kind] = w["aux"].get(kind, 0.0) + value
                w["tokens"] += inp.numel() * self.accum * self.world_size
                w["time"] += time.perf_counter() - t0
                if log_now:
                    self._log_step(lr, float(grad_norm))
                if (cfg.eval.every and self.step % cfg.eval.every == 0) or (self.step == t.steps and cfg.eval.at_end):
                    final = self._evaluate()
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.fold_partial_stats()  # collectives: every rank joins
                    rng_ranks = self.dp.gather_objects(self._rng_state())
                    if self.rank == 0:
                        save_checkpoint(self.run_dir, self.step, self.model, self.state_dict(rng_ranks),
                                        t.keep_checkpoints)  # fmt: skip
        except BaseException:
            self.progress.close()
            self._write_summary("failed", final)
            raise
        self.progress.close()
        self._write_summary("complete", final)
        self.scalar_logger.close()
        return final

    def describe(self) -> str:
        cfg, p = self.cfg, self.params
        lines = [
            f"run dir     {self.run_dir}",
            f"data        {self.mix.path} ({len(self.domains)} domains, vocab {self.mix.vocab_size})",
            f"parameters  total {p['total'] / 1e6:.2f}M, active per token {p['active'] / 1e6:.2f}M "
            f"(embedding {p['embedding'] / 1e6:.2f}M)",
        ]
        if cfg.model.dense:
            lines.append(f"model       dense baseline (FFN sized to equal {cfg.model.dense_match} parameters)")
        else:
            lines.append(
                f"routing     {cfg.routing.router}, top-{cfg.routing.top_k} of {cfg.model.n_experts}, "
                f"balance {cfg.balance.method} at {cfg.balance.scope} scope, capacity {cfg.balance.capacity_factor}"
            )
            if cfg.routing.router in ("reference", "domain_guided"):
                lines.append(f"groups      {describe_groups(self.domains, self.groups)}")
        if self.world_size > 1:
            lines.append(
                f"parallel    {self.world_size} data-parallel ranks on {self.device.type}, {self.accum} of the "
                f"{cfg.train.grad_accum} micro-batches per step each"
            )
        lines += [f"warning     {w}" for w in self.warnings]
        return "\n".join(lines)


def run_training(cfg: Config, run_dir: Path | None = None, resume: bool = False, log=print) -> tuple[Path, dict]:
    """Train ``cfg`` into ``run_dir`` (created, or resumed when it holds a checkpoint).

    Under torchrun every rank calls this; rank 0 writes the run directory and logs.
    """
    if run_dir is None:
        run_dir = Path(cfg.run.out_dir) / (cfg.run.name or default_run_name(cfg))
    run_dir = Path(run_dir)
    dp = init_data_parallel(cfg.train.device)
    try:
        trainer = Trainer(cfg, run_dir, dp, log=log if dp.is_main else lambda *_: None)
        if dp.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            trainer.resume()
        elif dp.is_main:
            cfg.save(run_dir / "config.yaml")
        trainer.log(trainer.describe())
        final = trainer.fit()
    finally:
        dp.close()
    return run_dir, final
