"""Routing of a pretrained Hugging Face MoE checkpoint on the domain mix: ``moe-testbed hf MODEL``.

The same tables and metrics as a trained run, for a model someone else trained:
the validation text of every domain of a mix is re-tokenized with the
checkpoint's own tokenizer, run through the model, and the experts each router
chose are counted per layer and domain into a run directory (``config.yaml``,
``metrics.jsonl``, ``routing/step_000000.npz``, ``summary.json``) that
``moe-testbed report`` reads like any other.

Which modules are routers is the model's own declaration: transformers' MoE
models name their router class in ``_can_record_outputs["router_logits"]``
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GraniteMoE, gpt-oss, DBRX, Jamba,
...). A forward hook on every instance records the expert indices the router
returns (its actual choice, bias corrections and group limits included); a
router that returns only logits is read as top-k of its logits with the
config's ``num_experts_per_tok``. Nothing is downloaded: the checkpoint must be
a local directory (or already in the local Hugging Face cache).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from moe_testbed.analysis.hf_trace import write_hf_trace
from moe_testbed.data import DomainMix
from moe_testbed.errors import UserError
from moe_testbed.io import atomic_write_json, atomic_write_text
from moe_testbed.routing.decision import RoutingDecision
from moe_testbed.routing.groups import reference_groups
from moe_testbed.routing.tables import RoutingTables, Snapshot, save_snapshot, snapshot_path
from moe_testbed.routing.trace import RoutingTrace
from moe_testbed.train.evaluate import loss_scalars


class HFModelError(UserError):
    """A checkpoint that cannot be loaded or has no routers (a user error, exit code 2)."""


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    """Model and tokenizer from a local directory or the local cache, never the network."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise HFModelError("moe-testbed hf needs transformers: pip install 'moe-testbed[hf]'") from None
    path = Path(name).expanduser()
    if path.is_dir():
        check_checkpoint_dir(path)
    elif not (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*", name) and _in_hub_cache(name)):
        raise HFModelError(f"{name}: no such directory, and no model of that id in the local Hugging Face cache "
                           "(nothing is downloaded): pass a directory written by save_pretrained")  # fmt: skip
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else name, local_files_only=True,
                                                     dtype=dtype)  # fmt: skip
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HFModelError(
            f"cannot load {name!r} offline ({first}): pass a directory written by save_pretrained "
            "(config.json, weights, tokenizer files)"
        ) from None
    return model.to(device).eval(), tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spm.model")


def check_checkpoint_dir(path: Path) -> None:
    """Name what a local checkpoint directory lacks, before transformers fails with a vaguer message."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise HFModelError(f"{path} has no {'; no '.join(missing)}: pass a directory written by the model's and the "
                           "tokenizer's save_pretrained")  # fmt: skip


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def router_declaration(model):
    """The ``OutputRecorder`` of ``router_logits`` the model (or one of its submodules) declares, or None.

    Most families declare it on the top-level class; Llama4, Gemma4 and Glm4vMoe text
    models declare it on the inner model only.
    """
    for module in model.modules():
        spec = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        if spec is not None:
            return spec
    return None


def expert_count(config) -> int | None:
    """The routed experts per MoE layer the config states, under the names transformers' families use."""
    configs = [config, getattr(config, "text_config", None), getattr(config, "ffn_config", None)]
    for cfg in (c for c in configs if c is not None):
        for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def find_routers(model) -> list[tuple[str, torch.nn.Module]]:
    """The model's router modules, in execution (layer) order, with their module paths."""
    spec = router_declaration(model)
    target = getattr(spec, "target_class", None)
    if target is None:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        raise HFModelError(
            f"{model_type} declares no router outputs (_can_record_outputs['router_logits']): it is not an MoE "
            "model transformers can report routing for; pass an MoE checkpoint such as Mixtral, Qwen-MoE or OLMoE"
        )
    # Older declarations name a generic class (nn.Linear) and the submodule path ("mlp.gate").
    where = getattr(spec, "layer_name", None)
    routers = [(n, m) for n, m in model.named_modules() if isinstance(m, target) and (not where or where in n)]
    if not routers:
        raise HFModelError(f"{type(model).__name__} has no {target.__name__} module: nothing to count")
    return routers


def top_k_of(config) -> int:
    for key in ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    ffn = getattr(config, "ffn_config", None)  # DBRX keeps it one level down
    value = getattr(ffn, "moe_top_k", None)
    if isinstance(value, int):
        return value
    raise HFModelError(f"{type(config).__name__} names no experts-per-token setting (num_experts_per_tok)")


class ChoiceRecorder:
    """Forward hooks that keep each router's decision for one forward, per layer: experts, gates, scores.

    The router's logits are its output number ``logits_index`` (the model's ``OutputRecorder``
    says which). Its choice is an integer output of shape [tokens, k] when it returns one
    (selection bias and group limits included), else top-k of the logits. Its gates are a
    float output of shape [tokens, k] beside that choice (Mixtral, OLMoE, DeepSeek-V3: the
    weights the model mixes with), else its float [tokens, E] scores at the chosen experts
    (Llama4), else the softmax of the logits there. ``probs_TE`` (for the trace's entropy and
    margin) is the softmax of the logits for every family. Logits over another number of
    experts than the config's are not this model's routing and are refused: never a wrong table.
    """

    def __init__(self, routers: list[tuple[str, torch.nn.Module]], top_k: int, logits_index: int = 0,
                 n_experts: int | None = None):  # fmt: skip
        self.top_k, self.logits_index = top_k, logits_index
        self.decisions: list[RoutingDecision | None] = [None] * len(routers)
        self.expected, self.n_experts = n_experts, n_experts
        self.names = [name for name, _ in routers]
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(routers)]

    @property
    def choices(self) -> list[torch.Tensor | None]:
        return [None if d is None else d.idx_TK for d in self.decisions]

    def clear(self) -> None:
        self.decisions = [None] * len(self.decisions)

    def _hook(self, layer: int):
        def hook(module, args, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            logits = outs[self.logits_index]
            E = logits.shape[-1]
            if self.expected is not None and self.expected != E:
                raise HFModelError(
                    f"router {self.names[layer]} gives logits over {E} entries but the config has {self.expected} "
                    f"experts: this family's routing ({type(module).__name__}) is not a top-k over expert logits, "
                    "which moe-testbed hf cannot count yet"
                )
            self.n_experts = E
            logits_TE = logits.reshape(-1, E).detach().float()
            rows, k = logits_TE.shape[0], self.top_k
            tensors = [o for o in outs if torch.is_tensor(o) and o is not logits and o.dim() >= 2]
            idx = next((o for o in tensors if not o.is_floating_point() and o.shape[-1] == k
                        and o.reshape(-1, k).shape[0] == rows), None)  # fmt: skip
            probs_TE = logits_TE.softmax(-1)
            idx_TK = (idx.reshape(-1, k) if idx is not None else logits_TE.topk(k, dim=-1).indices).detach()
            gate_TK = next((o.reshape(-1, k) for o in tensors if idx is not None and o.is_floating_point()
                            and o.shape[-1] == k and o.reshape(-1, k).shape[0] == rows), None)  # fmt: skip
            if gate_TK is None:
                scores = next((o.reshape(-1, E) for o in tensors if o.is_floating_point() and o.shape[-1] == E
                               and o.reshape(-1, E).shape[0] == rows), probs_TE)  # fmt: skip
                gate_TK = scores.gather(-1, idx_TK)
            self.decisions[layer] = RoutingDecision(idx_TK=idx_TK, gate_TK=gate_TK.detach().float(), probs_TE=probs_TE)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def domain_windows(mix: DomainMix, domain: str, tokenizer, seq_len: int, tokens_per_domain: int) -> list[list[int]]:
    """The domain's validation documents in the checkpoint's tokenization, cut into windows."""
    tokens = mix.array("val", "tokens")
    a, b = mix.domain_range("val", domain)
    ids = np.asarray(tokens[a:b])
    bounds = np.flatnonzero(ids == mix.eos_id)
    stream: list[int] = []
    start = 0
    eos = tokenizer.eos_token_id
    for end in [*bounds.tolist(), len(ids)]:
        if len(stream) >= tokens_per_domain:
            break
        if end > start:
            stream += tokenizer(mix.decode(ids[start:end]), add_special_tokens=False)["input_ids"]
            if eos is not None:
                stream.append(eos)
        start = end + 1
    stream = stream[:tokens_per_domain]
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


@torch.no_grad()
def measure(model, tokenizer, mix: DomainMix, domains: list[str], seq_len: int, tokens_per_domain: int,
            batch_size: int, device: torch.device, trace_tokens: int = 0) -> dict:  # fmt: skip
    """Counts [L, E, D], tokens [L, D], loss sums [D], predicted-token counts [D] and a trace of the first
    ``trace_tokens`` counted tokens (routing/trace.py; in the checkpoint's token ids) on the mix."""
    routers = find_routers(model)
    top_k = top_k_of(model.config)
    spec = router_declaration(model)
    rec = ChoiceRecorder(routers, top_k, getattr(spec, "index", None) or 0, expert_count(model.config))
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    L, D = len(routers), len(domains)
    counts: np.ndarray | None = None
    tokens = np.zeros((L, D), dtype=np.int64)
    loss_sum, loss_n = np.zeros(D), np.zeros(D, dtype=np.int64)
    trace, traced_seqs = RoutingTrace(L, top_k, trace_tokens), 0
    try:
        for d, name in enumerate(domains):
            windows = domain_windows(mix, name, tokenizer, seq_len, tokens_per_domain)
            for i in range(0, len(windows), batch_size):
                rows = [([bos] if bos is not None else []) + w for w in windows[i : i + batch_size]]
                width = max(map(len, rows))
                inp = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros_like(inp)
                for r, row in enumerate(rows):
                    inp[r, : len(row)] = torch.tensor(row)
                    mask[r, : len(row)] = 1
                counted = mask.clone()
                if bos is not None:
                    counted[:, 0] = 0  # the BOS every window starts with is not domain text
                out = model(input_ids=inp.to(device), attention_mask=mask.to(device))
                target = torch.where(counted[:, 1:].bool(), inp[:, 1:], -100).to(device)
                ce = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), target.flatten(), reduction="sum")
                loss_sum[d] += float(ce)
                loss_n[d] += int((target != -100).sum())
                keep = counted.flatten().bool().to(device)
                trace.begin(inp, torch.where(counted.bool(), d, -1), traced_seqs)
                traced_seqs += len(rows)
                for layer, idx in enumerate(rec.choices):
                    if idx is None or idx.shape[0] != keep.shape[0]:
                        raise HFModelError(f"router {routers[layer][0]} did not route this batch's tokens")
                    trace.record(layer, rec.decisions[layer])
                    if counts is None:
                        counts = np.zeros((L, rec.n_experts, D), dtype=np.int64)
                    chosen = idx[keep].flatten().cpu().numpy()
                    counts[layer, :, d] += np.bincount(chosen, minlength=rec.n_experts)
                    tokens[layer, d] += int(keep.sum())
                rec.clear()
    finally:
        rec.close()
    if counts is None:
        raise HFModelError("no validation text to route: the mix has no validation tokens for these domains")
    return {"counts": counts, "tokens": tokens, "loss_sum": loss_sum, "loss_n": loss_n, "top_k": top_k,
            "layers": [name for name, _ in routers], "trace": trace}  # fmt: skip


def write_run(out: Path, model_name: str, model, mix: DomainMix, domains: list[str], m: dict, settings: dict,
              tokenizer=None) -> Path:  # fmt: skip
    """A run directory that `moe-testbed report` reads: config, one eval record, one routing snapshot, and
    (with the tokenizer and a non-empty trace) the trace, its analyses and drill-down page (analysis/hf_trace.py)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "traces", out / "analyses.json", out / "drilldown.html"):  # of an earlier probe here
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    counts, tokens, k = m["counts"], m["tokens"], m["top_k"]
    L, E, C = counts.shape
    tables = RoutingTables(counts=counts, drops=np.zeros((L, C), dtype=np.int64), tokens=tokens)
    tables = tables.with_reference(reference_groups(domains, E, k), k)
    record: dict = {"kind": "eval", "step": 0, "tokens": int(tokens[0].sum())}
    record.update(loss_scalars(m["loss_sum"], m["loss_n"], domains))
    record.update(tables.scalars(m["layers"], prefix="val/"))
    model_type = getattr(model.config, "model_type", type(model).__name__)
    config = {
        "hf": {"model": model_name, "model_type": model_type, **settings},
        "data": {"dir": str(mix.path), "domains": domains, "seq_len": settings["seq_len"]},
        "model": {"n_experts": E, "n_moe_layers": L},
        "routing": {"router": f"pretrained:{model_type}", "top_k": k},
        "balance": {"method": "pretrained"},
        "run": {"name": out.name},
    }
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(out / "metrics.jsonl", json.dumps(record) + "\n")
    save_snapshot(snapshot_path(out, 0), Snapshot(0, m["layers"], domains, tables, k))
    trace = m.get("trace")
    if tokenizer is not None and trace is not None and trace.n > 0:
        meta = {"model": model_name, "mix": str(mix.path), "mix_fingerprint": mix.fingerprint, "n_experts": E}
        write_hf_trace(out, trace, m["layers"], domains, tokenizer, meta)
    params = sum(p.numel() for p in model.parameters())
    atomic_write_json(out / "summary.json", {"status": "complete", "params_total": params, "tokens": record["tokens"],
                                             "steps": 0, "final": record, "moe_layers": m["layers"],
                                             "written": time.strftime("%Y-%m-%dT%H:%M:%S")})  # fmt: skip
    return out
