"""Typed configuration for every part of the testbed.

One dataclass per component (OLMo-core style). A config is built from YAML plus
dotted command-line overrides (``model.n_experts=16``), validated *before* any
work starts, and written back as resolved YAML into every run directory.

Validation raises :class:`ConfigError` with one line naming the key and the
allowed values; the CLI turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in a configuration: one line, names the key and the fix."""


# Choices shared across the product. Routers and balancers register themselves in
# moe_testbed.routing.registry; their names are validated against that registry.
PACKINGS = ("domain", "mixed")
SCOPES = ("sequence", "microbatch", "global")
DROP_POLICIES = ("probs", "position")
DENSE_MATCH = ("active", "total")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class DataConfig:
    dir: str | None = None  # a built mix; None = the cache dir of `preset`
    preset: str = "tiny"  # built-in mix used when dir is None: default | tiny
    seq_len: int = 128
    packing: str = "domain"  # domain: one domain per sequence; mixed: documents of any domain
    weights: str | None = None  # None = balanced; "zipf" | "zipf:1.2" | "name=w,name=w"
    domains: list[str] | None = None  # restrict training to these domains of the mix
    auto_build: bool = True  # build the preset mix on first use


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_experts: int = 16
    expert_hidden: int = 256
    n_shared_experts: int = 0  # always-active experts of size expert_hidden
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0
    dense: bool = False  # replace every MoE FFN by a dense SwiGLU
    dense_hidden: int | None = None  # dense FFN width; None = sized by dense_match
    dense_match: str = "active"  # active | total: size the dense baseline to this MoE count
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    expert_impl: str = "auto"  # auto | loop | grouped_mm (auto: grouped matmul on CUDA)


@dataclass
class RoutingConfig:
    router: str = "softmax_topk"
    top_k: int = 2
    renormalize: bool = True  # renormalise the k gate weights to sum to 1
    noise_std: float = 1.0  # noisy_topk: scale of the learned noise
    freeze_after: int = 100  # frozen: optimizer steps before the router freezes
    groups: dict[str, list[int]] | None = None  # reference/domain_guided: domain -> experts
    inner: str = "uniform"  # reference: uniform | learned choice inside the group
    n_groups: int = 1  # group-limited routing: experts split into n_groups groups
    topk_groups: int = 1  # ... and each token may use experts of this many groups
    seq_capacity: float = 1.0  # expert_choice: experts pick capacity*T*k/E tokens


@dataclass
class BalanceConfig:
    method: str = "lbl"  # none | lbl | eb | sh | ba
    scope: str = "microbatch"  # sequence | microbatch | global
    coeff: float = 0.01  # LBL coefficient (top-k normalised f, see docs/routing.md)
    z_loss: float = 0.0  # router z-loss coefficient, combinable with any method
    eb_rate: float = 1e-3  # EB bias update step
    sinkhorn_iters: int = 20  # SH Sinkhorn iterations
    ba_iters: int = 50  # BA: cap on auction rounds (then a greedy completion)
    capacity_factor: float | None = None  # None = dropless
    eval_capacity_factor: float | None = None  # capacity during evaluation
    drop_policy: str = "probs"  # probs: keep highest gates; position: keep earliest


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step over all data-parallel ranks together
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    threads: int | None = None  # torch intra-op threads; None = torch's default
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    routing_stats: bool = True  # accumulate n[layer, expert, domain] during training


@dataclass
class EvalConfig:
    every: int = 100
    tokens_per_domain: int = 8192
    batch_size: int = 8
    at_end: bool = True


@dataclass
class ParallelConfig:
    expert_parallel: int = 1


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str | None = None  # run directory name; None = derived from the config
    tensorboard: bool = False
    progress: str = "auto"  # auto (bar on a terminal) | bar | log | none


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- conversion -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        from moe_testbed.io import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Config:
        return _build(cls, raw or {}, prefix="")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass a YAML file such as configs/quick.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (data, model, routing, ...)")
        raw.pop("study", None)  # study files carry a grid beside the base config
        apply_overrides(raw, overrides)
        cfg = cls.from_dict(raw)
        cfg.validate()
        return cfg

    def replace(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted-key overrides applied (used by studies)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        cfg = Config.from_dict(raw)
        return cfg

    # ---- validation -------------------------------------------------------
    def validate(self) -> None:
        """Reject impossible combinations before any work starts."""
        _choice("data.packing", self.data.packing, PACKINGS)
        _choice("balance.scope", self.balance.scope, SCOPES)
        _choice("balance.drop_policy", self.balance.drop_policy, DROP_POLICIES)
        _choice("model.dense_match", self.model.dense_match, DENSE_MATCH)
        _choice("train.device", self.train.device, DEVICES)
        _choice("train.dtype", self.train.dtype, DTYPES)
        _choice("run.progress", self.run.progress, ("auto", "bar", "log", "none"))
        _choice("routing.inner", self.routing.inner, ("uniform", "learned"))
        _choice("model.expert_impl", self.model.expert_impl, ("auto", "loop", "grouped_mm"))
        m, r, b, t = self.model, self.routing, self.balance, self.train
        for key, value in [
            ("model.d_model", m.d_model),
            ("model.n_layers", m.n_layers),
            ("model.n_heads", m.n_heads),
            ("model.n_experts", m.n_experts),
            ("model.expert_hidden", m.expert_hidden),
            ("model.moe_every", m.moe_every),
            ("routing.top_k", r.top_k),
            ("data.seq_len", self.data.seq_len),
            ("train.steps", t.steps),
            ("train.micro_batch_size", t.micro_batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.log_every", t.log_every),
            ("train.checkpoint_every", t.checkpoint_every),
            ("eval.every", self.eval.every),
            ("eval.batch_size", self.eval.batch_size),
        ]:
            if value < 1:
                raise ConfigError(f"{key}={value} must be >= 1")
        if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
            raise ConfigError(
                f"model.d_model={m.d_model} must be a multiple of model.n_heads={m.n_heads} "
                "with an even head size (RoPE rotates pairs)"
            )
        if r.top_k > m.n_experts:
            raise ConfigError(
                f"routing.top_k={r.top_k} exceeds model.n_experts={m.n_experts}: choose top_k in 1..{m.n_experts}"
            )
        if m.moe_every > m.n_layers and not m.dense:
            raise ConfigError(
                f"model.moe_every={m.moe_every} > model.n_layers={m.n_layers} leaves no MoE layer: "
                "lower moe_every or set model.dense=true"
            )
        if m.n_shared_experts < 0:
            raise ConfigError(f"model.n_shared_experts={m.n_shared_experts} must be >= 0")
        for key, value in [
            ("balance.capacity_factor", b.capacity_factor),
            ("balance.eval_capacity_factor", b.eval_capacity_factor),
        ]:
            if value is not None and value <= 0:
                raise ConfigError(f"{key}={value} must be > 0, or null for dropless")
        if b.coeff < 0 or b.z_loss < 0:
            raise ConfigError("balance.coeff and balance.z_loss must be >= 0")
        if not m.dense:
            # Router/balancer names and their pairwise compatibility live with the
            # implementations, so that a new method touches one place.
            from moe_testbed.routing.registry import check_combination

            check_combination(self)


# ---- helpers --------------------------------------------------------------


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # `model.x=a,b` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a mapping")
        return {_coerce(key, k, key_tp): _coerce(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a string")
        return value
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}: allowed keys are {', '.join(prefix + n for n in names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name] if raw[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, raw[name], tp)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. routing.top_k=4)")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    for text in overrides:
        key, value = parse_override(text)
        if "." not in key:
            raise ConfigError(f"override {text!r} must name a section and a key, e.g. train.steps=100")
        _set_dotted(raw, key, value)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (or the defaults when None) with overrides, validated."""
    if path is None:
        raw: dict[str, Any] = {}
        apply_overrides(raw, overrides)
        cfg = Config.from_dict(raw)
        cfg.validate()
        return cfg
    return Config.load(path, overrides)
