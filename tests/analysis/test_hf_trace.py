"""The per-token trace of `moe-testbed hf` (analysis/hf_trace.py): choices, gates and classes of a pretrained router."""

import json

import numpy as np
import pytest
import torch

from moe_testbed.analysis.hf import domain_windows, load_model, measure, write_run
from moe_testbed.analysis.report import write_report
from moe_testbed.analysis.token_routing import TOKEN_CLASSES, token_class
from moe_testbed.data import DomainMix
from moe_testbed.routing.trace import load_trace, trace_path
from tests.analysis.test_hf import save_tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mix(tiny_data_dir):
    return DomainMix(tiny_data_dir)


def probe(kind, mix, tmp_path, trace_tokens, domains=None):
    model, tok = load_model(str(save_tiny(kind, mix, tmp_path / kind)), CPU, torch.float32)
    domains = domains or mix.domains[:2]
    m = measure(model, tok, mix, domains, 64, 128, 2, CPU, trace_tokens=trace_tokens)
    out = write_run(tmp_path / f"run-{kind}", kind, model, mix, domains, m, {"seq_len": 64}, tok)
    return model, tok, domains, m, out


@torch.no_grad()
def router_outputs(model, tok, mix, domains):
    """transformers' own router_logits for every probed window, in probe order: [L, tokens, E]."""
    per_layer = []
    for name in domains:
        for w in domain_windows(mix, name, tok, 64, 128):
            out = model(input_ids=torch.tensor([w]), output_router_logits=True)
            per_layer.append([g.float() for g in out.router_logits])
    return [torch.cat([p[layer] for p in per_layer]) for layer in range(len(per_layer[0]))]


def test_the_trace_holds_every_probed_token_with_the_routers_choice_and_gates(mix, tmp_path):
    model, tok, domains, m, out = probe("mixtral", mix, tmp_path, trace_tokens=10_000)
    trace = load_trace(trace_path(out, 0))
    k, E = 2, 4
    assert trace.token.size == 128 * len(domains)  # every probed token fits the budget
    # The trace's slots recount the table exactly, per layer and domain.
    for layer in range(len(m["layers"])):
        for d in range(len(domains)):
            rows = trace.domain == d
            counted = np.bincount(trace.experts[layer][rows].ravel(), minlength=E)
            np.testing.assert_array_equal(counted, m["counts"][layer, :, d])
    # Mixtral's gates: softmax over the logits, top-2, renormalised (recomputed from transformers' outputs).
    for layer, logits in enumerate(router_outputs(model, tok, mix, domains)):
        top = logits.softmax(-1).topk(k, dim=-1)
        np.testing.assert_array_equal(trace.experts[layer], top.indices.numpy())
        np.testing.assert_allclose(trace.gates[layer], (top.values / top.values.sum(-1, keepdim=True)).numpy(),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        p = logits.softmax(-1)
        entropy = -(p * p.log()).sum(-1)
        np.testing.assert_allclose(trace.entropy[layer], entropy.numpy(), rtol=1e-4, atol=1e-6)
        s = p.sort(-1, descending=True).values
        np.testing.assert_allclose(trace.margin[layer], (s[:, k - 1] - s[:, k]).numpy(), rtol=1e-4, atol=1e-6)
    # Classes are the checkpoint tokenizer's decoding of each id.
    expected = [TOKEN_CLASSES.index(token_class(tok.decode([int(t)]))) for t in trace.token]
    np.testing.assert_array_equal(trace.token_class, expected)
    analyses = json.loads((out / "analyses.json").read_text())
    assert analyses["tokens"] == trace.token.size and len(analyses["syntax_or_topic"]["per_layer"]) == 2
    assert 0 <= analyses["syntax_or_topic"]["mean"]["nmi_class"] <= 1
    assert "<h3>expert" in (out / "drilldown.html").read_text()


def test_llama4_gates_are_its_sigmoid_scores_at_the_chosen_expert(mix, tmp_path):
    model, tok, domains, m, out = probe("llama4", mix, tmp_path, trace_tokens=10_000, domains=mix.domains[:1])
    trace = load_trace(trace_path(out, 0))
    modules = dict(model.named_modules())
    logits: dict[str, list] = {name: [] for name in m["layers"]}
    hooks = [modules[name].register_forward_hook(lambda mod, a, o, name=name: logits[name].append(o[1].float()))
             for name in m["layers"]]  # fmt: skip
    router_outputs(model, tok, mix, domains)
    for h in hooks:
        h.remove()
    for layer, name in enumerate(m["layers"]):
        top = torch.cat(logits[name]).topk(1, dim=-1)
        np.testing.assert_array_equal(trace.experts[layer], top.indices.numpy())
        np.testing.assert_allclose(trace.gates[layer], torch.sigmoid(top.values).numpy(), rtol=1e-5, atol=1e-6)


def test_the_budget_keeps_the_first_tokens_and_a_later_probe_leaves_no_stale_trace(mix, tmp_path):
    _, _, domains, m, out = probe("olmoe", mix, tmp_path, trace_tokens=100)
    trace = load_trace(trace_path(out, 0))
    assert trace.token.size == 100 and (trace.domain == 0).all()  # the first domain's first 100 tokens
    assert trace.seq.tolist() == [0] * 64 + [1] * 36 and trace.pos.tolist() == list(range(64)) + list(range(36))
    model, tok = load_model(str(tmp_path / "olmoe"), CPU, torch.float32)
    m0 = measure(model, tok, mix, domains, 64, 128, 2, CPU, trace_tokens=0)
    write_run(out, "olmoe", model, mix, domains, m0, {"seq_len": 64}, tok)
    assert not (out / "traces").exists() and not (out / "analyses.json").exists()
    assert not (out / "drilldown.html").exists()


def test_the_report_of_an_hf_probe_has_the_token_level_table_and_the_drilldown(mix, tmp_path):
    _, _, _, _, out = probe("mixtral", mix, tmp_path, trace_tokens=200)
    page = write_report([out], tmp_path / "report").read_text()
    assert "Token-level routing of 200 validation tokens" in page
    assert "NMI expert~token class" in page and "href='drilldown.html'" in page
    assert "<h3>expert" in (tmp_path / "report" / "drilldown.html").read_text()
