"""analysis/hf.py: routing tables of pretrained Hugging Face MoE checkpoints, offline."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_testbed.analysis.hf import HFModelError, domain_windows, find_routers, load_model, measure, write_run
from moe_testbed.analysis.rundir import load_run
from moe_testbed.data import DomainMix
from moe_testbed.routing.metrics import routing_scalars

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=256)  # fmt: skip


def tokenizer_of(mix: DomainMix):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(mix.path / "tokenizer.json"), eos_token="<|endoftext|>")


def save_tiny(kind: str, mix: DomainMix, out):
    """A random tiny checkpoint of a transformers architecture, with the mix's tokenizer."""
    import transformers as tf

    tok = tokenizer_of(mix)
    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(vocab_size=len(tok), intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                               **TINY)  # fmt: skip
        model = tf.MixtralForCausalLM(cfg)
    elif kind == "olmoe":
        cfg = tf.OlmoeConfig(vocab_size=len(tok), intermediate_size=32, num_experts=8, num_experts_per_tok=3, **TINY)
        model = tf.OlmoeForCausalLM(cfg)
    elif kind == "deepseek_v3":  # sigmoid scores, group-limited, with a selection bias
        cfg = tf.DeepseekV3Config(vocab_size=len(tok), intermediate_size=64, moe_intermediate_size=32,
                                  first_k_dense_replace=0, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                  topk_group=1, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                  **{**TINY, "num_key_value_heads": 2})  # fmt: skip
        model = tf.DeepseekV3ForCausalLM(cfg)
        for module in model.modules():  # a bias that overrides the scores: every token picks experts 6 and 7
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(torch.tensor([0.0] * 6 + [5.0, 5.0]))
    elif kind == "llama4":  # declares its routers on the inner text model; output 1 is the logits
        cfg = tf.Llama4TextConfig(vocab_size=len(tok), intermediate_size=64, intermediate_size_mlp=64,
                                  num_local_experts=4, num_experts_per_tok=1, head_dim=16, **TINY)  # fmt: skip
        model = tf.Llama4ForCausalLM(cfg)
    elif kind == "jetmoe":  # output 0 of its gate is a sorted slot index, output 4 the logits
        cfg = tf.JetMoeConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_key_value_heads=1,
                              kv_channels=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                              max_position_embeddings=256)  # fmt: skip
        model = tf.JetMoeForCausalLM(cfg)
    elif kind == "doge":  # product-key routing: logits over 2 x sqrt(E) keys, not over the 16 experts
        cfg = tf.DogeConfig(vocab_size=len(tok), intermediate_size=64, num_experts=16, num_experts_per_tok=2,
                            is_moe=True, **TINY)  # fmt: skip
        model = tf.DogeForCausalLM(cfg)
    else:  # a dense model: no routers
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), intermediate_size=64, **TINY))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mix(tiny_data_dir):
    return DomainMix(tiny_data_dir)


def test_windows_carry_the_domain_text_in_the_checkpoint_tokenization(mix):
    tok = tokenizer_of(mix)  # the mix's own tokenizer: re-tokenizing must give back the same ids
    name = mix.domains[0]
    windows = domain_windows(mix, name, tok, seq_len=50, tokens_per_domain=300)
    assert [len(w) for w in windows] == [50] * 6
    a, _ = mix.domain_range("val", name)
    original = np.asarray(mix.array("val", "tokens")[a : a + 300]).tolist()
    assert sum(windows, []) == original


@pytest.mark.parametrize("kind", ["mixtral", "olmoe", "llama4", "jetmoe"])
def test_counts_are_the_routers_choices(kind, mix, tmp_path):
    model, tok = load_model(str(save_tiny(kind, mix, tmp_path / kind)), torch.device("cpu"), torch.float32)
    domains = mix.domains[:3]
    m = measure(model, tok, mix, domains, seq_len=64, tokens_per_domain=128, batch_size=2, device=torch.device("cpu"))
    k, L = model.config.num_experts_per_tok, model.config.num_hidden_layers
    L *= 2 if kind == "jetmoe" else 1  # JetMoE routes its attention heads too: two routers a layer
    assert m["top_k"] == k and len(m["layers"]) == L
    # transformers lists router_logits in execution order (JetMoE: attention before MLP)
    called = []
    names = dict((mod, name) for name, mod in model.named_modules())
    hooks = [mod.register_forward_hook(lambda mod, a, o: called.append(names[mod])) for mod in names
             if names[mod] in m["layers"]]  # fmt: skip
    assert (m["counts"].sum(1) == m["tokens"] * k).all()  # every counted token has k slots
    assert (m["tokens"] == 128).all()  # the BOS-less tokenizer: exactly the requested tokens
    # Independent recount from transformers' own router_logits output (softmax top-k).
    expected = np.zeros_like(m["counts"])
    for d, name in enumerate(domains):
        for w in domain_windows(mix, name, tok, 64, 128):
            called.clear()
            out = model(input_ids=torch.tensor([w]), output_router_logits=True)
            assert len(called) == len(out.router_logits) == L
            for name, logits in zip(called, out.router_logits):
                layer = m["layers"].index(name)
                idx = logits.float().softmax(-1).topk(k, dim=-1).indices
                expected[layer, :, d] += np.bincount(idx.flatten().numpy(), minlength=expected.shape[1])
    for h in hooks:
        h.remove()
    np.testing.assert_array_equal(m["counts"], expected)
    assert ((m["loss_sum"] / m["loss_n"]) > 0).all()


def test_counts_follow_the_routers_actual_choice_not_its_logits(mix, tmp_path):
    model, tok = load_model(str(save_tiny("deepseek_v3", mix, tmp_path / "ds")), torch.device("cpu"), torch.float32)
    m = measure(model, tok, mix, mix.domains[:2], 32, 64, 2, torch.device("cpu"))
    chosen = m["counts"].sum(2)  # [L, E]
    assert (chosen[:, 6] == m["tokens"].sum(1)).all() and (chosen[:, 7] == m["tokens"].sum(1)).all()
    assert chosen[:, :6].sum() == 0  # top-k of the logits alone would have spread the tokens


def test_run_directory_reads_like_a_trained_run(mix, tmp_path):
    model, tok = load_model(str(save_tiny("mixtral", mix, tmp_path / "m")), torch.device("cpu"), torch.float32)
    m = measure(model, tok, mix, mix.domains, 64, 128, 4, torch.device("cpu"))
    out = write_run(tmp_path / "run", "m", model, mix, mix.domains, m, {"seq_len": 64, "tokens_per_domain": 128})
    run = load_run(out)
    assert run.status == "complete" and run.domains == mix.domains
    assert run.config_value("routing.top_k") == 2 and run.config_value("model.n_experts") == 4
    final = run.final
    expected = routing_scalars(m["counts"], m["layers"], prefix="val/")
    for key in ("val/util/mean", "val/purity/mean", "val/nmi/mean"):
        assert final[key] == pytest.approx(expected[key])
    assert 0 < final["val/specialization/mean"] <= 1


def test_cli_end_to_end_and_user_errors(mix, tmp_path, cli_env, capsys):
    from moe_testbed.cli import main

    ckpt = save_tiny("mixtral", mix, tmp_path / "moe")
    cmd = [sys.executable, "-m", "moe_testbed", "hf", str(ckpt), "--data", str(mix.path), "--tokens-per-domain",
           "128", "--seq-len", "64", "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "2 MoE layers, top-2 of 4 experts" in proc.stdout
    page = (tmp_path / "run" / "report.html").read_text()
    probed = 128 * len(mix.domains)  # within the default trace budget: every probed token
    assert f"Token-level routing of {probed} validation tokens" in page and "href='drilldown.html'" in page
    assert f"trace of {probed} tokens" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["moe_layers"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]

    dense = save_tiny("llama", mix, tmp_path / "dense")
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((ckpt / "config.json").read_text())
    cases = [(dense, "declares no router outputs"), (tmp_path / "nothing", "no such directory"),
             (tmp_path / "empty", "has no config.json; no weights"),
             (tmp_path / "config_only", "has no weights (*.safetensors or pytorch_model*.bin); no tokenizer files"),
             ("no-such-org/no-such-model", "no such directory, and no model of that id in the local Hugging Face cache"),
             (save_tiny("doge", mix, tmp_path / "doge"), "gives logits over 4 entries but the config has 16 experts")]  # fmt: skip
    for model, message in cases:
        capsys.readouterr()
        assert main(["hf", str(model), *cmd[5:]]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_bf16_checkpoint_is_measured_in_bf16_on_cpu(mix, tmp_path):
    ckpt = save_tiny("mixtral", mix, tmp_path / "m")
    model, tok = load_model(str(ckpt), torch.device("cpu"), torch.bfloat16)
    assert model.dtype == torch.bfloat16
    m = measure(model, tok, mix, mix.domains[:2], 64, 128, 2, torch.device("cpu"))
    assert (m["counts"].sum(1) == m["tokens"] * 2).all() and np.isfinite(m["loss_sum"]).all()
    fp32, _ = load_model(str(ckpt), torch.device("cpu"), torch.float32)
    m32 = measure(fp32, tok, mix, mix.domains[:2], 64, 128, 2, torch.device("cpu"))
    # bf16 rounding may flip a near tie, not the routing: the tables agree on almost every slot
    assert np.abs(m["counts"] - m32["counts"]).sum() <= 0.05 * m32["counts"].sum()


def test_find_routers_refuses_a_dense_model(mix, tmp_path):
    model, _ = load_model(str(save_tiny("llama", mix, tmp_path / "d")), torch.device("cpu"), torch.float32)
    with pytest.raises(HFModelError, match="not an MoE model"):
        find_routers(model)
