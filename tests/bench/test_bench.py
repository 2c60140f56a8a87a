"""The bench runs end to end on tiny shapes, writes the documented JSON, and refuses wrong variants.

No timing assertions: absolute and relative times on shared CI machines mean nothing.
"""

import json

import pytest
import torch

from moe_testbed.bench.guard import FP32_TOL, compare, reference_moe, untie_routing
from moe_testbed.bench.layer import LayerShape, run_layer
from moe_testbed.bench.report import markdown, print_rich, write_json
from moe_testbed.bench.run import BenchOptions, run_bench
from moe_testbed.bench.timing import interleaved
from moe_testbed.model.experts import GroupedExperts

TINY_SHAPE = LayerShape("tiny", d_model=32, expert_hidden=16, n_experts=4, top_k=2, tokens=64, max_vs_dense=1.5)
TINY_MODEL = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_experts=4", "model.expert_hidden=16",
    "data.seq_len=16", "train.micro_batch_size=2", "train.log_every=2",
]  # fmt: skip


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    opts = BenchOptions(quick=True, threads=1, device="cpu", overrides=TINY_MODEL, vocab=64, grad_accum=2,
                        repeats=1, layer_shapes=(TINY_SHAPE,))  # fmt: skip
    res = run_bench(opts, log=quiet)
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    write_json(res, path)
    return json.loads(path.read_text())


def test_json_has_every_section_and_target(result):
    assert {"meta", "layer", "step", "balance", "stats", "targets"} <= set(result)
    assert result["meta"]["quick"] is True and result["meta"]["threads"] == 1
    shape = result["layer"]["shapes"][0]
    assert shape["name"] == "tiny" and shape["shape"]["n_experts"] == 4
    for name in ("dense", "moe", "hf_grouped_mm", "hf_eager"):
        v = shape["variants"][name]
        assert v["timed"] and v["guard"]["ok"] and v["guard"]["max_rel_err"] < FP32_TOL
        assert set(v["ms"]) == {"median", "q1", "q3", "min", "max"} and len(v["times_ms"]) == 1
        assert v["peak_mib"] > 0
    assert {"moe/dense", "hf_grouped_mm/dense", "hf_best/moe"} <= set(shape["ratios"])
    assert shape["ratios"]["hf_best/moe"]["versus"] in ("hf_grouped_mm", "hf_eager")
    step = result["step"]
    assert step["variants"]["moe"]["tokens_per_s"] > 0 and "moe_tokens_per_s/dense" in step["ratios"]
    assert step["params"]["dense"]["total"] < step["params"]["moe"]["total"]
    bal = result["balance"]
    assert bal["variants"]["none"]["timed"]
    assert {"z_loss", "seq_aux", "jitter", "soft_moe"} <= set(bal["overhead_pct"])  # beside the methods
    assert {"lbl", "eb", "sh", "ba", "qb"} <= {k.split("@")[0] for k in bal["overhead_pct"]}
    assert "total" in result["stats"]["overhead_pct"]
    names = [t["target"] for t in result["targets"]]
    assert any(n.startswith("layer tiny: MoE / dense") for n in names)
    assert any(n.startswith("step:") for n in names) and any(n.startswith("stats:") for n in names)
    for t in result["targets"]:
        assert isinstance(t["pass"], bool) and t["op"] in ("<=", ">=")


def test_tables_render(result, capsys):
    print_rich(result)
    md = markdown(result)
    assert "| target |" in md and ("PASS" in md or "MISS" in md)
    assert "Targets" in capsys.readouterr().out


class _WrongGrad(torch.autograd.Function):
    """Right output, gradient scaled by 0.5: only a gradient check can catch it."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return 0.5 * g


@pytest.mark.parametrize("wrong", ["output", "gradient"])
def test_guard_refuses_a_wrong_variant(monkeypatch, wrong):
    right = GroupedExperts.forward

    def broken(self, x_TD, idx_TK, gate_TK, keep_TK=None):
        y = right(self, x_TD, idx_TK, gate_TK, keep_TK)
        return y * (1 + 1e-3) if wrong == "output" else _WrongGrad.apply(y)

    monkeypatch.setattr(GroupedExperts, "forward", broken)
    section, targets = run_layer([TINY_SHAPE], torch.device("cpu"), torch.float32, FP32_TOL, 1, 0, 0.0, False, quiet)
    shape = section["shapes"][0]
    assert shape["refused"] == ["moe"]
    assert not shape["variants"]["moe"]["timed"] and not shape["variants"]["moe"]["guard"]["ok"]
    assert shape["variants"]["dense"]["timed"] and shape["variants"]["hf_grouped_mm"]["timed"]
    assert "moe/dense" not in shape["ratios"]
    assert all(not t["pass"] for t in targets)  # an untimed variant cannot pass a target


def test_reference_is_independent_and_exact_in_float64():
    torch.manual_seed(0)
    T, D, H, E, K = 40, 16, 8, 5, 2
    router = torch.randn(E, D, dtype=torch.float64)
    x = untie_routing(torch.randn(T, D, dtype=torch.float64), router, K)
    w13, w2 = torch.randn(E, D, 2 * H, dtype=torch.float64), torch.randn(E, H, D, dtype=torch.float64)
    experts = GroupedExperts(E, D, H, impl="loop").double()
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
    probs = torch.softmax(x @ router.t(), -1)
    gate, idx = probs.topk(K, -1)
    got = experts(x, idx, gate / gate.sum(-1, keepdim=True))
    assert compare({"out": got}, {"out": reference_moe(x, router, w13, w2, K)}, 1e-12).ok


def test_interleaved_pairs_every_variant_per_repeat():
    calls = []
    t = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "a", repeats=3, warmup=1)
    assert len(t.times["a"]) == len(t.times["b"]) == 3
    assert calls[:2] == ["a", "b"] and calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]  # rotated order
    assert t.ratio("b")["median"] > 0
