import pytest
import yaml

from moe_testbed.config import Config, ConfigError, load_config


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config(None)
    path = tmp_path / "c.yaml"
    cfg.save(path)
    again = Config.load(path)
    assert again == cfg


def test_dotted_overrides_apply_with_types():
    cfg = load_config("configs/quick.yaml", ["model.n_experts=32", "routing.top_k=4", "balance.capacity_factor=1.25"])
    assert cfg.model.n_experts == 32 and cfg.routing.top_k == 4
    assert cfg.balance.capacity_factor == 1.25
    assert load_config(None, ["balance.capacity_factor=null"]).balance.capacity_factor is None
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # int accepted for float


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.n_expert=4", "unknown key model.n_expert"),
        ("modle.d_model=4", "unknown key modle"),
        ("model.n_experts=four", "model.n_experts='four' has the wrong type"),
        ("routing.top_k=9", "routing.top_k=9 exceeds model.n_experts=8"),
        ("balance.scope=batch", "balance.scope='batch' is not allowed: choose one of sequence, microbatch, global"),
        ("routing.router=magic", "routing.router='magic' is not allowed"),
        ("model.d_model=100", "multiple of model.n_heads"),
        ("balance.capacity_factor=0", "must be > 0"),
        ("train.steps=0", "train.steps=0 must be >= 1"),
        ("data.packing=shuffled", "data.packing='shuffled' is not allowed: choose one of domain, mixed"),
        ("balance.eb_rate=0", "balance.eb_rate=0.0 must be > 0"),  # a method's own knob (eb.py)
        ("balance.sinkhorn_iters=0", "balance.sinkhorn_iters=0 must be >= 1"),
        ("routing.noise_std=-1", "routing.noise_std=-1.0 must be >= 0"),  # a router's own knob
        ("routing.inner=random", "routing.inner='random' is not allowed: choose one of uniform, learned"),
        ("balance.sinkhorn=3", "unknown key balance.sinkhorn: allowed keys are balance.method,"),
        ("parallel.expert_parallel=-1", "parallel.expert_parallel=-1 must be >= 1"),
        ("parallel.expert_parallel=16", "parallel.expert_parallel=16 must divide model.n_experts"),
        ("parallel.timeout_s=0", "parallel.timeout_s=0.0 must be > 0"),
    ],
)
def test_bad_config_fails_with_one_line(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.n_experts=8", override])
    msg = str(exc.value)
    assert needle in msg
    assert "\n" not in msg


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(p)
    p.write_text(yaml.safe_dump({"model": {"d_model": "x"}}))
    with pytest.raises(ConfigError, match="model.d_model"):
        Config.load(p)
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["routing.top_k"])
    with pytest.raises(ConfigError, match="must name a section"):
        load_config(None, ["steps=3"])


def test_knobs_are_declared_by_their_components_and_read_like_fields():
    from moe_testbed.config import section_knobs

    routing, balance = section_knobs("routing"), section_knobs("balance")
    assert {"noise_std", "freeze_after", "inner", "seq_capacity", "renormalize", "n_groups"} <= set(routing)
    assert {"coeff", "eb_rate", "sinkhorn_iters", "ba_iters"} <= set(balance)
    for knobs in (routing, balance):  # every default passes its own check
        assert all(k.check is None or k.check(k.default) is None for k in knobs.values())
    cfg = load_config(None, ["balance.eb_rate=0.01"])
    assert cfg.balance.eb_rate == 0.01 and cfg.balance.sinkhorn_iters == 20  # set, and the default
    assert cfg.to_dict()["balance"]["sinkhorn_iters"] == 20  # config.yaml lists every knob
    with pytest.raises(AttributeError, match="no key 'eb_rat'"):
        _ = cfg.balance.eb_rat
    assert load_config(None, ["balance.eb_rate=0.001"]) == load_config(None)  # equal to the default
