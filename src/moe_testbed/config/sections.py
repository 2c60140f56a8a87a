"""The sections of a run's config, one dataclass per component, and their validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from moe_testbed.config.knob_section import KnobSection, check_knobs, section_dict
from moe_testbed.config.parse import apply_overrides, build, set_dotted
from moe_testbed.data.sampling import PACKINGS
from moe_testbed.devices import DEVICES, DTYPES
from moe_testbed.errors import ConfigError
from moe_testbed.routing.names import CAPACITY_SCOPES, DROP_POLICIES, SCOPES

DENSE_MATCH = ("active", "total")
EXPERT_IMPLS = ("auto", "loop", "grouped_mm")
PROGRESS = ("auto", "bar", "log", "none")


@dataclass
class DataConfig:
    dir: str | None = None  # a built mix; None = the cache dir of `preset`
    preset: str = "tiny"  # built-in mix used when dir is None: default | tiny
    seq_len: int = 128
    packing: str = "domain"  # domain: one domain per sequence; mixed: documents of any domain
    weights: str | None = None  # None = balanced; "zipf" | "zipf:1.2" | "name=w,name=w"
    domains: list[str] | None = None  # restrict training to these domains of the mix
    microbatch_domains: int | None = None  # distinct domains per micro-batch; None: each row drawn on its own
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
    init_from: str | None = None  # a trained dense run to upcycle from (train/upcycle.py)
    upcycle_noise: float = 0.0  # relative noise on the upcycled experts' copies


@dataclass(eq=False)
class RoutingConfig(KnobSection):
    KIND: ClassVar[str] = "routing"
    router: str = "softmax_topk"
    top_k: int = 2
    # domain -> experts of the reference grouping: what the reference and domain_guided routers route
    # by, and what every run's reference counts (P_ref, specialization) assume; None = the default split
    groups: dict[str, list[int]] | None = None
    knobs: dict[str, Any] = field(default_factory=dict, repr=False)  # the routers' own keys


@dataclass(eq=False)
class BalanceConfig(KnobSection):
    KIND: ClassVar[str] = "balance"
    method: str = "lbl"  # a registered balancing method: none | lbl | eb | sh | ba | ...
    scope: str = "microbatch"  # sequence | microbatch | global
    z_loss: float = 0.0  # router z-loss coefficient, combinable with any method
    # DeepSeek-V3's sequence-wise balance loss beside any method (routing/balancer.py); 0 = off
    seq_aux_coeff: float = 0.0
    capacity_factor: float | None = None  # None = dropless
    eval_capacity_factor: float | None = None  # capacity during evaluation
    capacity_scope: str = "microbatch"  # the capacity unit, independent of scope: microbatch | sequence
    drop_policy: str = "probs"  # probs: keep highest gates; position: keep earliest
    knobs: dict[str, Any] = field(default_factory=dict, repr=False)  # the methods' own keys


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step over all data-parallel ranks together
    # micro-batches a rank forwards at once (they stay the units of microbatch scope); None: the whole
    # step when it fits train/step.py's budget. Exact global scope needs the whole step in one forward.
    forward_microbatches: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, and on a CPU where bf16 is measured faster (devices.py)
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
    # Per-token routing of the first this-many validation tokens, saved at every evaluation as
    # traces/step_NNNNNN.parquet (routing/trace.py); 0 saves none.
    trace_tokens: int = 8192


@dataclass
class ParallelConfig:
    # Ranks that share one copy of the experts, each holding n_experts / expert_parallel of them
    # (train/expert_parallel.py); the world size must be a multiple of it. 1 = data parallelism only.
    expert_parallel: int = 1
    # A collective that waits longer than this (a hung or stopped peer) fails the run instead of
    # blocking for torch's default 30 minutes (train/distributed.py).
    timeout_s: float = 600.0


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
        return {f.name: section_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        from moe_testbed.io import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Config:
        return build(cls, raw or {}, prefix="")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass a YAML file such as configs/quick.yaml")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if raw is None:
            raise ConfigError(
                f"config file {path} is empty: write the sections to change (model:, routing:, train:, ...), "
                "e.g. start from configs/quick.yaml; omit the file to train the built-in defaults"
            )
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
            set_dotted(raw, key, value)
        return Config.from_dict(raw)

    # ---- validation -------------------------------------------------------
    def validate(self) -> None:
        """Reject impossible combinations before any work starts."""
        for key, value, allowed in [
            ("data.packing", self.data.packing, PACKINGS),
            ("balance.scope", self.balance.scope, SCOPES),
            ("balance.drop_policy", self.balance.drop_policy, DROP_POLICIES),
            ("balance.capacity_scope", self.balance.capacity_scope, CAPACITY_SCOPES),
            ("model.dense_match", self.model.dense_match, DENSE_MATCH),
            ("train.device", self.train.device, DEVICES),
            ("train.dtype", self.train.dtype, DTYPES),
            ("run.progress", self.run.progress, PROGRESS),
            ("model.expert_impl", self.model.expert_impl, EXPERT_IMPLS),
        ]:
            _choice(key, value, allowed)
        self._validate_counts()
        self._validate_ranges()
        self._validate_model()
        for section in (self.routing, self.balance):
            check_knobs(section)
        if not self.model.dense:
            # Router/balancer names and their pairwise compatibility live with the
            # implementations, so that a new method touches one place.
            from moe_testbed.routing.registry import check_combination

            check_combination(self)

    def _validate_counts(self) -> None:
        m, t = self.model, self.train
        for key, value in [
            ("model.d_model", m.d_model),
            ("model.n_layers", m.n_layers),
            ("model.n_heads", m.n_heads),
            ("model.n_experts", m.n_experts),
            ("model.expert_hidden", m.expert_hidden),
            ("model.moe_every", m.moe_every),
            ("routing.top_k", self.routing.top_k),
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

    def _validate_ranges(self) -> None:
        """Every other number a run reads, where a value outside its range would fail late or mean nothing."""
        m, t, d, e = self.model, self.train, self.data, self.eval
        checks = [
            ("train.lr", t.lr, t.lr > 0, "must be > 0"),
            ("train.min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "must be >= 0"),
            ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "must be >= 0"),
            ("train.beta1", t.beta1, 0 <= t.beta1 < 1, "must be in [0, 1)"),
            ("train.beta2", t.beta2, 0 <= t.beta2 < 1, "must be in [0, 1)"),
            ("train.grad_clip", t.grad_clip, t.grad_clip > 0, "must be > 0"),
            ("train.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 1, "must be >= 1"),
            ("train.threads", t.threads, t.threads is None or t.threads >= 1, "must be >= 1, or null"),
            ("train.forward_microbatches", t.forward_microbatches,
             t.forward_microbatches is None or t.forward_microbatches >= 1, "must be >= 1, or null for the default"),
            ("eval.tokens_per_domain", e.tokens_per_domain, e.tokens_per_domain >= 1, "must be >= 1"),
            ("eval.trace_tokens", e.trace_tokens, e.trace_tokens >= 0, "must be >= 0 (0: no trace)"),
            ("model.init_std", m.init_std, m.init_std > 0, "must be > 0"),
            ("model.rope_theta", m.rope_theta, m.rope_theta > 0, "must be > 0"),
            ("model.dense_hidden", m.dense_hidden, m.dense_hidden is None or m.dense_hidden >= 1, "must be >= 1, or null"),
            ("data.microbatch_domains", d.microbatch_domains, d.microbatch_domains is None or d.microbatch_domains >= 1,
             "must be >= 1, or null"),
        ]  # fmt: skip
        for key, value, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key}={value} {why}")

    def _validate_model(self) -> None:
        m, b = self.model, self.balance
        if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
            raise ConfigError(
                f"model.d_model={m.d_model} must be a multiple of model.n_heads={m.n_heads} "
                "with an even head size (RoPE rotates pairs)"
            )
        if self.routing.top_k > m.n_experts:
            raise ConfigError(
                f"routing.top_k={self.routing.top_k} exceeds model.n_experts={m.n_experts}: "
                f"choose top_k in 1..{m.n_experts}"
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
        if b.z_loss < 0:
            raise ConfigError(f"balance.z_loss={b.z_loss} must be >= 0")
        if m.init_from is not None and (m.dense or m.n_shared_experts):
            raise ConfigError(
                f"model.init_from={m.init_from} upcycles a dense run into routed experts: it needs model.dense=false "
                "and model.n_shared_experts=0"
            )
        if m.upcycle_noise < 0 or (m.upcycle_noise > 0 and m.init_from is None):
            raise ConfigError(f"model.upcycle_noise={m.upcycle_noise} must be >= 0 and needs model.init_from=RUN_DIR")
        if b.seq_aux_coeff < 0:
            raise ConfigError(f"balance.seq_aux_coeff={b.seq_aux_coeff} must be >= 0")
        p = self.parallel
        if p.expert_parallel < 1:
            raise ConfigError(f"parallel.expert_parallel={p.expert_parallel} must be >= 1 (1 = no expert parallelism)")
        if p.expert_parallel > 1 and m.dense:
            raise ConfigError(
                "parallel.expert_parallel > 1 needs an MoE model: set model.dense=false or expert_parallel=1"
            )
        if p.expert_parallel > 1 and m.n_experts % p.expert_parallel:
            raise ConfigError(
                f"parallel.expert_parallel={p.expert_parallel} must divide model.n_experts={m.n_experts}: "
                "each rank of an expert-parallel group holds the same number of experts"
            )
        if p.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s={p.timeout_s} must be > 0 (seconds a collective may wait)")


# ---- helpers --------------------------------------------------------------


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (or the defaults when None) with overrides, validated."""
    if path is None:
        raw: dict[str, Any] = {}
        apply_overrides(raw, overrides)
        cfg = Config.from_dict(raw)
        cfg.validate()
        return cfg
    return Config.load(path, overrides)
