"""``moe-testbed eval RUN_DIR [--data MIX]``: a trained run's checkpoint evaluated on a labelled mix, with its trace.

The run's model (its config, its latest or a chosen checkpoint) routes the
validation text of a mix, by default its own, or another one (the design-choices
paper measured routing on MMLU categories and XNLI languages rather than on its
training data). The other mix must share the run's tokenizer (the same token ids:
``moe-testbed data build --tokenizer-from RUN_MIX``). Domains are mapped by name; a
domain the run did not train on keeps its own label in the tables (the domain
routers, which route *by* the label, refuse such a mix). Writes into
``--out`` (default ``RUN_DIR/eval/<mix>-step<N>``):

    eval.json          the validation scalars (loss per domain, utilization, purity, ...)
    routing.npz        the expert x domain tables (a routing snapshot)
    trace.parquet      per-token routing (routing/trace.py)
    analyses.json      the token-level analyses (analysis/token_routing.py)
    drilldown.html     which text each expert takes (analysis/drilldown.py)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from moe_testbed.analysis.drilldown import write_drilldown
from moe_testbed.analysis.token_routing import analyse, vocabulary_classes
from moe_testbed.config import Config
from moe_testbed.config.sections import DataConfig
from moe_testbed.data import ensure_mix
from moe_testbed.data.loader import val_batches
from moe_testbed.devices import autocast_for, resolve_device
from moe_testbed.errors import ConfigError
from moe_testbed.io import atomic_write_json
from moe_testbed.model import Transformer
from moe_testbed.routing.groups import reference_groups
from moe_testbed.routing.registry import ROUTERS
from moe_testbed.routing.tables import Snapshot, save_snapshot
from moe_testbed.routing.trace import RoutingTrace, load_trace, save_trace
from moe_testbed.train.checkpoint import latest_checkpoint, load_checkpoint
from moe_testbed.train.evaluate import evaluate


def _mix_for(spec: str | None, cfg: Config):
    if spec is None:
        return ensure_mix(cfg.data)
    path = Path(spec).expanduser()
    return ensure_mix(DataConfig(dir=str(path)) if path.is_dir() else DataConfig(preset=spec))


def _tokenizer_digest(mix) -> str:
    return hashlib.sha256((mix.path / "tokenizer.json").read_bytes()).hexdigest()


def _checkpoint(run_dir: Path, step: int | None) -> Path:
    if step is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"{run_dir} has no checkpoint to evaluate: train it first (or pass another run)")
        return ckpt
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    if not ckpt.is_dir():
        have = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        raise ConfigError(f"--step {step}: no checkpoint {ckpt.name} in {run_dir}; it has {', '.join(have) or 'none'}")
    return ckpt


def evaluate_run(run_dir: Path, data: str | None = None, step: int | None = None, tokens_per_domain: int | None = None,
                 trace_tokens: int = 65536, out: Path | None = None, log=print) -> Path:  # fmt: skip
    """Evaluate ``run_dir``'s checkpoint on the mix ``data`` (None: the run's own); returns the output directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml there; pass a run directory written by train")
    cfg = Config.load(run_dir / "config.yaml", [])
    if cfg.model.dense:
        raise ConfigError(f"{run_dir} is a dense run: it has no routing to evaluate")
    run_mix, mix = ensure_mix(cfg.data), _mix_for(data, cfg)
    if mix.vocab_size != run_mix.vocab_size or _tokenizer_digest(mix) != _tokenizer_digest(run_mix):
        raise ConfigError(
            f"the mix in {mix.path} has another tokenizer than the run's ({run_mix.path}): its token ids mean other "
            f"text to this model; build it with `moe-testbed data build --tokenizer-from {run_mix.path} ...`"
        )
    unknown = [d for d in mix.domains if d not in run_mix.domains]
    by_label = ROUTERS[cfg.routing.router].uses_domain_groups  # reference, domain_guided
    if unknown and by_label:
        raise ConfigError(
            f"routing.router={cfg.routing.router} routes by the domain label, and the run never saw "
            f"{', '.join(unknown)}: evaluate it on a mix of its own domains"
        )
    ckpt = _checkpoint(run_dir, step)
    device = resolve_device(cfg.train.device)
    groups = reference_groups(run_mix.domains, cfg.model.n_experts, cfg.routing.top_k, cfg.routing.groups)
    info = {"domains": run_mix.domains, "groups": groups, "token_frequencies": run_mix.token_frequencies,
            "vocab_size": run_mix.vocab_size}  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg, run_mix.vocab_size, info).to(device)
    state = load_checkpoint(ckpt, model)
    step_done = int(state.get("step", int(ckpt.name.split("_")[-1])))
    batches = val_batches(mix, cfg.data.seq_len, cfg.eval.batch_size, tokens_per_domain or cfg.eval.tokens_per_domain)
    if by_label:  # the router reads the label: the run's domain ids, and the run's domains as the tables' columns
        domains, eval_groups = run_mix.domains, groups
        batches = [(n, i, t, torch.where(d >= 0, run_mix.domains.index(n), d)) for n, i, t, d in batches]
    else:  # the label only labels: the evaluated mix's own domains
        domains = mix.domains
        eval_groups = reference_groups(domains, cfg.model.n_experts, cfg.routing.top_k, None)
    trace = RoutingTrace(len(model.moe_layers), cfg.routing.top_k, trace_tokens)
    autocast = autocast_for(device, "float32")
    scalars, tables = evaluate(model, batches, domains, eval_groups, device, autocast, trace=trace)
    out = Path(out) if out else run_dir / "eval" / f"{mix.path.name}-step{step_done}"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"run": str(run_dir), "checkpoint": ckpt.name, "step": step_done, "mix": str(mix.path),
            "mix_fingerprint": mix.fingerprint, "run_mix_fingerprint": run_mix.fingerprint,
            "domains_not_trained_on": unknown}  # fmt: skip
    save_snapshot(out / "routing.npz", Snapshot(step_done, model.moe_layer_names, domains, tables, cfg.routing.top_k))
    save_trace(out / "trace.parquet", trace.table(model.moe_layer_names, domains,
                                                  {**meta, "n_experts": cfg.model.n_experts}))  # fmt: skip
    saved = load_trace(out / "trace.parquet")
    analyses = analyse(saved, vocabulary_classes(mix.decode, mix.vocab_size))
    write_drilldown(out / "drilldown.html", saved, mix.decode, f"{run_dir.name} step {step_done} on {mix.path.name}")
    atomic_write_json(out / "analyses.json", {**meta, **analyses})
    atomic_write_json(out / "eval.json", {**meta, **scalars})
    m, a = scalars, analyses
    log(f"eval {run_dir.name} step {step_done} on {mix.path.name} ({len(domains)} domains): val loss "
        f"{m['val/loss']:.3f}, utilization {m.get('val/util/mean', float('nan')):.3f}, purity "
        f"{m.get('val/purity/mean', float('nan')):.3f}; NMI expert~class {a['syntax_or_topic']['mean']['nmi_class']:.3f}"
        f" vs expert~domain {a['syntax_or_topic']['mean']['nmi_domain']:.3f} -> {out}")  # fmt: skip
    return out
