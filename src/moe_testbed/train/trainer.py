"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, live routing stats.

Determinism: everything random (init, router noise, data order) derives from
``train.seed``; the data loader is a pure function of the batch index and the
checkpoint holds the RNG state, so a run killed at any moment and resumed ends
with the same weights as an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from moe_testbed.allocator import keep_freed_memory
from moe_testbed.config import Config
from moe_testbed.data import ensure_mix
from moe_testbed.data.loader import TrainLoader, val_batches
from moe_testbed.devices import autocast_for, uses_bf16
from moe_testbed.errors import ConfigError
from moe_testbed.io import atomic_write_json, atomic_write_text
from moe_testbed.model import Transformer, count_params
from moe_testbed.model.transformer import moe_layer_indices
from moe_testbed.routing.groups import reference_groups
from moe_testbed.routing.recorder import RoutingRecorder
from moe_testbed.routing.registry import BALANCERS, ROUTERS
from moe_testbed.routing.tables import Snapshot, save_snapshot, snapshot_path
from moe_testbed.routing.trace import RoutingTrace, save_trace, trace_path
from moe_testbed.train.checkpoint import (
    checkpoint_identity,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from moe_testbed.train.ddp import GradientSync
from moe_testbed.train.describe import describe
from moe_testbed.train.distributed import DataParallel, check_same_checkpoint, init_data_parallel
from moe_testbed.train.evaluate import evaluate
from moe_testbed.train.expert_parallel import check_expert_parallel, expert_parallel_for, rank_load_scalars
from moe_testbed.train.progress import Progress
from moe_testbed.train.run_dir import prepare as prepare_run_dir
from moe_testbed.train.schedule import lr_at
from moe_testbed.train.setup import build_optimizer, default_run_name
from moe_testbed.train.state import LogWindow, TrainState, checkpoint_payload, fold_partial_stats, restore, rng_state
from moe_testbed.train.step import forward_microbatches, micro_step, optimizer_step
from moe_testbed.train.tensorboard import ScalarLogger
from moe_testbed.train.upcycle import dense_checkpoint, upcycle

TRAIN_ROUTING_KEYS = ("drop_rate/mean", "util/mean", "purity/mean")


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, dp: DataParallel | None = None, log=print):
        """``dp``: this process's place in a data-parallel run (distributed.py); None = alone."""
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log
        t = cfg.train
        self.dp = dp or init_data_parallel(t.device, cfg.parallel.timeout_s)
        self.rank, self.world_size, self.group = self.dp.rank, self.dp.world_size, self.dp.group
        self.accum = self.dp.local_accumulation(t.grad_accum)
        self.per_forward = forward_microbatches(
            t.forward_microbatches, self.accum, t.micro_batch_size * cfg.data.seq_len
        )
        if t.threads:
            torch.set_num_threads(t.threads)
        keep_freed_memory()  # see allocator.py: fewer page faults per step on CPU
        self.device = self.dp.device
        self.bf16 = uses_bf16(t.dtype, self.device, self._matmul_probe_shape())
        self.autocast = autocast_for(self.device, "bfloat16" if self.bf16 else "float32")
        self.mix = ensure_mix(cfg.data)
        self.domains = self.mix.domains
        torch.manual_seed(t.seed)
        self.groups = reference_groups(self.domains, cfg.model.n_experts, cfg.routing.top_k, cfg.routing.groups)
        info = {"domains": self.domains, "groups": self.groups, "token_frequencies": self.mix.token_frequencies,
                "vocab_size": self.mix.vocab_size}  # fmt: skip
        self.model = Transformer(cfg, self.mix.vocab_size, info).to(self.device)
        self.init_from = self._upcycle() if cfg.model.init_from else None
        self.dp.broadcast_model(self.model)
        self.params = count_params(self.model)  # of the whole model, before its experts are sharded
        self.ep = expert_parallel_for(cfg, self.model, self.world_size, self.device)  # shards the experts in place
        if self.world_size > 1:  # same weights everywhere, but each rank its own router noise
            torch.manual_seed(self.dp.rank_seed(t.seed))
        self.sync = GradientSync(self.model, self.world_size, self.ep.shard_ids if self.ep else None)
        self.optimizer = build_optimizer(self.model, cfg)
        self.loader = TrainLoader(
            self.mix, cfg.data.seq_len, t.micro_batch_size, t.seed, packing=cfg.data.packing, weights=cfg.data.weights,
            domains=cfg.data.domains, rank=self.rank, world_size=self.world_size,
            batch_domains=cfg.data.microbatch_domains,
        )  # fmt: skip
        self.val_batches = val_batches(
            self.mix, cfg.data.seq_len, cfg.eval.batch_size, cfg.eval.tokens_per_domain, cfg.data.domains
        )
        n_moe = max(len(moe_layer_indices(cfg)), 1)
        self.recorder = RoutingRecorder(n_moe, cfg.model.n_experts, len(self.domains), self.device)
        self.state = TrainState(since_eval=np.zeros((n_moe, cfg.model.n_experts, len(self.domains)), dtype=np.int64))
        self.warnings: list[str] = []
        self.global_scope = self._global_scope_mode()
        self.definitions = self._own_definitions()
        if not cfg.model.dense and not ROUTERS[cfg.routing.router].causal:
            self.warnings.append(
                f"routing.router={cfg.routing.router} is not causal: a token's expert depends on other tokens of the "
                "batch, which a causal LM cannot see at inference; compare its loss with care"
            )

    def _upcycle(self) -> str:
        """Experts and the rest from a trained dense run (train/upcycle.py); returns its checkpoint's identity."""
        m = self.cfg.model
        ckpt = dense_checkpoint(m.init_from)
        upcycle(self.model, load_file(str(ckpt / "model.safetensors")), m.upcycle_noise, self.cfg.train.seed,
                m.init_from)  # fmt: skip
        return f"{Path(m.init_from).expanduser().resolve()}:{checkpoint_identity(ckpt)}"

    def _matmul_probe_shape(self) -> tuple[int, int, int]:
        """(rows, inner, cols) of one expert's share of a forward: the matmul where bf16 on a CPU pays least."""
        m, tokens = self.cfg.model, self.per_forward * self.cfg.train.micro_batch_size * self.cfg.data.seq_len
        rows = tokens if m.dense else tokens * self.cfg.routing.top_k // m.n_experts
        return rows, m.d_model, m.expert_hidden

    def _global_scope_mode(self) -> str | None:
        """``exact`` when a forward holds the rank's whole step, ``carried`` otherwise; None below global scope."""
        cfg = self.cfg
        if cfg.model.dense or cfg.balance.scope != "global":
            return None
        if self.per_forward == self.accum:
            return "exact"
        if cfg.routing.router == "expert_choice":
            raise ConfigError(
                f"routing.router=expert_choice at balance.scope=global needs the whole step in one forward, but "
                f"train.forward_microbatches={self.per_forward} < the {self.accum} micro-batches of a step on this "
                f"rank: set train.forward_microbatches={self.accum}"
            )
        self.warnings.append(
            f"balance.scope=global: a step takes {self.accum // self.per_forward} forwards of {self.per_forward} "
            "micro-batches, so global-scope balancing uses statistics carried from the previous step "
            "(docs/routing.md#scope), not the exact step"
        )
        return "carried"

    def _own_definitions(self) -> list[str]:
        """What in this run is the testbed's own definition rather than a paper's or a peer's."""
        cfg, out = self.cfg, []
        if cfg.model.dense:
            return out
        b = cfg.balance
        if b.scope in BALANCERS[b.method].own_definition_scopes:
            out.append(f"balance.method={b.method} at balance.scope={b.scope} is the testbed's own definition")
        if self.global_scope == "carried":
            out.append(f"balance.method={b.method} at global scope used statistics carried from the previous step")
        return out

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.run_dir)
        if self.world_size > 1:  # every rank must load the checkpoint rank 0 wrote
            check_same_checkpoint(self.dp.gather_objects(checkpoint_identity(ckpt)), self.run_dir)
        if ckpt is None:
            return False
        payload = load_checkpoint(ckpt, self.model, self.ep.slice_weights if self.ep else None)
        self.optimizer = build_optimizer(self.model, self.cfg)
        if self.ep:
            payload["optimizer"] = self.ep.slice_optimizer_state(self.optimizer, payload["optimizer"])
        restore(payload, self.state, self.optimizer, self.loader, self.recorder, self.model, self.dp,
                self.cfg.train.seed)  # fmt: skip
        if self.rank == 0:
            self._truncate_metrics(self.state.step)
        self.log(f"resumed {self.run_dir} from {ckpt.name} (step {self.state.step})")
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

    def _write_summary(self, status: str, final: dict | None = None, reason: str | None = None) -> None:
        if self.rank != 0:
            return
        s = self.state
        atomic_write_json(
            self.run_dir / "summary.json",
            {
                "status": status,
                "reason": reason,
                # who writes it, and when last: a reader tells a run still going from one that was
                # killed without a word (SIGKILL, a lost node) by these (analysis/rundir.py)
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "updated": round(time.time(), 1),
                "params_total": self.params["total"],
                "params_active": self.params["active"],
                "params_embedding": self.params["embedding"],
                "tokens": s.tokens,
                "steps": s.step,
                "world_size": self.world_size,
                "expert_parallel": self.cfg.parallel.expert_parallel,
                "wall_s": round(s.wall(), 2),
                "tokens_per_s": round(s.train_tokens / max(s.train_time, 1e-9), 1),
                "final": final or {},
                "train_routing": s.train_routing,
                "warnings": self.warnings,
                "mix_fingerprint": self.mix.fingerprint,
                "init_from": self.init_from,  # the dense checkpoint an upcycled run started from
                "forward_microbatches": self.per_forward,
                "dtype": "bfloat16" if self.bf16 else "float32",
                "global_scope": self.global_scope,
                "domains_per_microbatch": round(s.microbatch_domains / max(s.microbatches, 1), 3),
                "definitions": self.definitions,
                "reference_groups": {d: g for d, g in zip(self.domains, self.groups)},
                "moe_layers": self.model.moe_layer_names,
            },
        )

    def _log_step(self, lr: float, grad_norm: float) -> None:
        s, w = self.state, self.state.window
        # Means over ranks: every rank logs (and rank 0 writes) the numbers of the whole run.
        sums = self.dp.sum({"loss": torch.as_tensor(w.loss), **{k: torch.as_tensor(v) for k, v in w.aux.items()}})
        loss = float(sums.pop("loss") / self.world_size) / max(w.n, 1)
        record = {"kind": "train", "step": s.step, "tokens": s.tokens, "loss": loss, "lr": lr}
        record["grad_norm"] = grad_norm
        record["tokens_per_s"] = w.tokens / max(w.time, 1e-9)
        for kind, value in sums.items():
            record[f"aux/{kind}"] = float(value / self.world_size) / max(w.n, 1)
        s.train_time += w.time
        s.train_tokens += w.tokens
        if self.model.moe_layers and self.cfg.train.routing_stats:
            tables = self.recorder.tables(self.group)
            s.since_eval += tables.counts
            record.update(tables.scalars(self.model.moe_layer_names))
            if self.ep:
                record.update(rank_load_scalars(tables.counts, self.model.moe_layer_names, self.ep.size))
            self.recorder.reset()
            s.train_routing = {f"train/{k}": record[k] for k in TRAIN_ROUTING_KEYS if k in record}
        self._write_metrics(record)
        self.progress.update(s.step, record)
        s.window = LogWindow()

    def _evaluate(self) -> dict:
        s = self.state
        n_trace = self.cfg.eval.trace_tokens if self.rank == 0 and self.model.moe_layers else 0
        trace = RoutingTrace(len(self.model.moe_layers), self.cfg.routing.top_k, n_trace) if n_trace else None
        scalars, tables = evaluate(self.model, self.val_batches, self.domains, self.groups, self.device,
                                   self.autocast, self.group, lockstep=self.ep is not None, trace=trace)  # fmt: skip
        record = {"kind": "eval", "step": s.step, "tokens": s.tokens, **scalars}
        if self.ep and tables is not None:
            record.update(rank_load_scalars(tables.counts, self.model.moe_layer_names, self.ep.size, "val/"))
        self._write_metrics(record)
        if tables is not None and self.rank == 0:
            snap = Snapshot(s.step, self.model.moe_layer_names, self.domains, tables, self.cfg.routing.top_k,
                            train_counts=s.since_eval)  # fmt: skip
            save_snapshot(snapshot_path(self.run_dir, s.step), snap)
            if trace is not None:
                extra = {"step": s.step, "mix_fingerprint": self.mix.fingerprint, "n_experts": self.cfg.model.n_experts}
                save_trace(
                    trace_path(self.run_dir, s.step), trace.table(self.model.moe_layer_names, self.domains, extra)
                )
            s.since_eval = np.zeros_like(s.since_eval)
        self.progress.note(f"eval step {s.step}: val loss {scalars['val/loss']:.3f}")
        return record

    def _checkpoint(self) -> None:
        fold_partial_stats(self.state, self.recorder, self.dp)  # collectives: every rank joins
        rng_ranks = self.dp.gather_objects(rng_state())
        weights, optim = self.ep.full_state(self.model, self.optimizer) if self.ep else (None, None)  # collectives
        if self.rank == 0:
            payload = checkpoint_payload(self.state, self.optimizer, self.loader, self.recorder, self.model, rng_ranks)
            if optim is not None:  # the checkpoint holds the unsharded model: it resumes at any expert-parallel size
                payload["optimizer"] = optim
            save_checkpoint(self.run_dir, self.state.step, self.model, payload, self.cfg.train.keep_checkpoints,
                            weights=weights)  # fmt: skip

    # -- the loop -------------------------------------------------------------
    def _train_step(self) -> tuple[float, torch.Tensor]:
        """One optimizer step over this rank's micro-batches; returns (lr, grad norm before clipping)."""
        t, s = self.cfg.train, self.state
        lr = lr_at(s.step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_acc = torch.zeros((), device=self.device)
        aux_acc: dict[str, torch.Tensor] = {}
        recorder = self.recorder if t.routing_stats else None
        n, forwards = self.per_forward, self.accum // self.per_forward
        for f in range(forwards):
            parts = [self.loader.next_batch() for _ in range(n)]
            s.microbatch_domains += sum(int(torch.unique(dom).numel()) for _, _, dom in parts)
            s.microbatches += n
            inp, tgt, dom = (torch.cat(x).to(self.device, non_blocking=True) for x in zip(*parts))
            with self.sync.forward(last=f == forwards - 1) as module:  # DDP reduces in the last backward
                ce, aux = micro_step(
                    module, inp, tgt, dom, step=s.step, microbatch=f * n, accum=forwards,
                    microbatch_size=t.micro_batch_size, whole_step=forwards == 1, autocast=self.autocast,
                    group=self.group, recorder=recorder,
                )  # fmt: skip
            loss_acc += ce / forwards
            for kind, value in aux.items():
                aux_acc[kind] = aux_acc.get(kind, 0.0) + value / forwards
            s.tokens += inp.numel() * self.world_size
        grad_norm = optimizer_step(self.model, self.optimizer, t.grad_clip, s.step + 1, self.ep)
        s.step += 1
        # Sums stay on the device; .item() happens only on log steps, so there is no
        # host sync per micro-batch.
        w = s.window
        w.n += 1
        w.loss = w.loss + loss_acc
        for kind, value in aux_acc.items():
            w.aux[kind] = w.aux.get(kind, 0.0) + value
        w.tokens += inp.numel() * forwards * self.world_size
        w.time += time.perf_counter() - t0
        return lr, grad_norm

    def fit(self) -> dict:
        cfg, t, s = self.cfg, self.cfg.train, self.state
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.scalar_logger = ScalarLogger(self.run_dir, cfg.run.tensorboard and self.rank == 0)
        self.progress = Progress(t.steps, cfg.run.progress, enabled=self.rank == 0, start=s.step)
        self._write_summary("running")
        final: dict = {}
        try:
            self.model.train()
            while s.step < t.steps:
                lr, grad_norm = self._train_step()
                if s.step % t.log_every == 0 or s.step == t.steps:
                    self._log_step(lr, float(grad_norm))  # the one host sync per log step
                if (cfg.eval.every and s.step % cfg.eval.every == 0) or (s.step == t.steps and cfg.eval.at_end):
                    final = self._evaluate()
                if s.step % t.checkpoint_every == 0 or s.step == t.steps:
                    self._checkpoint()
                    if s.step < t.steps:
                        self._write_summary("running")  # the steps reached, and a sign of life
        except BaseException as exc:
            self.progress.close()
            remove_partial_checkpoints(self.run_dir)
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):  # a full disk may refuse even this small file
                self._write_summary("failed", final, reason=reason.strip().splitlines()[0])
            raise
        self.progress.close()
        self._write_summary("complete", final)
        self.scalar_logger.close()
        return final


def run_training(
    cfg: Config, run_dir: Path | None = None, resume: bool | None = None, log=print, fork_from: Path | None = None
) -> tuple[Path, dict]:
    """Train ``cfg`` into ``run_dir``: a new run, or the run there continued (train/run_dir.py decides).

    ``resume``: True to continue the run in ``run_dir`` (``--resume``); None to start, or to continue
    a run there with the same config. ``fork_from``: continue that run's latest checkpoint in ``run_dir``.
    Under torchrun every rank calls this; rank 0 writes the run directory and logs.
    """
    if run_dir is None:
        run_dir = Path(cfg.run.out_dir) / (cfg.run.name or default_run_name(cfg))
    run_dir = Path(run_dir)
    dp = init_data_parallel(cfg.train.device, cfg.parallel.timeout_s)
    trainer = None
    try:
        check_expert_parallel(cfg.parallel.expert_parallel, dp.world_size)  # before anything is written
        cont = prepare_run_dir(cfg, run_dir, resume, fork_from) if dp.is_main else None
        cont = dp.gather_objects(cont)[0]  # every rank follows rank 0's decision
        trainer = Trainer(cfg, run_dir, dp, log=log if dp.is_main else lambda *_: None)
        if cont:
            trainer.resume()
        trainer.log(describe(trainer))
        final = trainer.fit()
    finally:
        if trainer is not None:
            trainer.sync.close()  # before the process group goes
        dp.close()
    return run_dir, final
