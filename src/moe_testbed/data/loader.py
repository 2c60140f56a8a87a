"""Batches for training and validation.

Legend: B batch rows, S sequence length. Every batch is ``(input_ids [B,S],
targets [B,S], domain_ids [B,S])``, int64; ``targets`` is the input shifted
by one, and ``domain_ids[b, s]`` is the domain of the *input* token
``input_ids[b, s]`` (an EOS belongs to the document it ends).

The train loader is a pure function of ``(seed, batch index, rank)``: batch
``i`` of rank ``r`` draws from a generator seeded with
``(seed, i * world_size + r)``, so ranks get different batches, and a resumed
run gets exactly the batches it would have had, on any number of ranks (the
position is stored as batches of the global order). Its state is the batch index.

Packing:

* ``domain`` (default) -- each row is a window of S+1 tokens at a random
  offset in one domain's training stream (its documents concatenated, EOS
  between them): one domain per sequence.
* ``mixed`` -- each row starts at a random position of a random domain and
  continues with whole documents of randomly drawn domains, so domains change
  inside a row at document boundaries.

Domains are drawn per row with probabilities from ``weights``: balanced by
default, ``zipf`` / ``zipf:A`` (domain i of the selection gets 1/(i+1)^A), or
``name=w,name=w`` (unlisted domains keep weight 1). With ``batch_domains``
(``data.microbatch_domains``) a batch first draws that many distinct domains
and its rows take them in turn, so that a micro-batch holds exactly that mix.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from moe_testbed.data.errors import DataError
from moe_testbed.data.sampling import PACKINGS, parse_weights

if TYPE_CHECKING:
    from moe_testbed.data.mix import DomainMix

IGNORE_INDEX = -100


class TrainLoader:
    def __init__(
        self,
        mix: DomainMix,
        seq_len: int,
        batch_size: int,
        seed: int,
        packing: str = "domain",
        weights: str | None = None,
        domains: list[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        batch_domains: int | None = None,
    ) -> None:
        if packing not in PACKINGS:
            raise DataError(f"packing {packing!r} is not allowed: choose one of {', '.join(PACKINGS)}")
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
        self.mix, self.seq_len, self.batch_size, self.seed = mix, seq_len, batch_size, int(seed)
        self.packing, self.weights, self.rank, self.world_size = packing, weights, rank, world_size
        self.names = mix.select(domains)
        if batch_domains is not None and not 1 <= batch_domains <= len(self.names):
            raise DataError(
                f"data.microbatch_domains={batch_domains} must be in 1..{len(self.names)} (the selected domains)"
            )
        self.batch_domains = batch_domains
        self.ids = [mix.domain_id(n) for n in self.names]
        self.probs = parse_weights(weights, self.names)
        self.ranges = [mix.domain_range("train", n) for n in self.names]
        for name, (a, b) in zip(self.names, self.ranges):
            if b - a < seq_len + 1:
                raise DataError(
                    f"domain {name} has {b - a} training tokens, fewer than seq_len+1={seq_len + 1}: "
                    "lower seq_len or rebuild with more --tokens-per-domain"
                )
        self.tokens = mix.array("train", "tokens")
        self.doms = mix.array("train", "domains")
        self.docs = mix.array("train", "docs")
        self.batch_index = 0

    # ---- sampling -----------------------------------------------------------
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index * self.world_size + self.rank])

    def _domain_row(self, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.ranges[k]
        start = a + int(rng.integers(0, b - a - self.seq_len))
        window = np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        return window, np.full(self.seq_len + 1, self.ids[k], dtype=np.int64)

    def _mixed_row(self, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
        need, toks, doms, first = self.seq_len + 1, [], [], True
        while need > 0:
            a, b = self.ranges[k]
            pos = a + int(rng.integers(0, b - a))
            j = int(np.searchsorted(self.docs, pos, side="right")) - 1
            start = pos if first else int(self.docs[j])  # later pieces are whole documents from their start
            end = min(int(self.docs[j + 1]), start + need)
            toks.append(np.asarray(self.tokens[start:end], dtype=np.int64))
            doms.append(np.asarray(self.doms[start:end], dtype=np.int64))
            need -= end - start
            first = False
            k = int(rng.choice(len(self.names), p=self.probs))
        return np.concatenate(toks), np.concatenate(doms)

    def batch_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``index`` of this rank (a pure function of seed, index and rank)."""
        rng = self._rng(index)
        if self.batch_domains is None:  # each row's domain on its own
            rows = rng.choice(len(self.names), size=self.batch_size, p=self.probs)
        else:  # `batch_domains` distinct domains, the rows spread over them in turn
            chosen = rng.choice(len(self.names), size=self.batch_domains, replace=False, p=self.probs)
            rows = chosen[np.arange(self.batch_size) % self.batch_domains]
        row_fn = self._domain_row if self.packing == "domain" else self._mixed_row
        toks, doms = zip(*(row_fn(rng, int(k)) for k in rows))
        t = torch.from_numpy(np.stack(toks))
        d = torch.from_numpy(np.stack(doms))
        return t[:, :-1].contiguous(), t[:, 1:].contiguous(), d[:, :-1].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.batch_index)
        self.batch_index += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ---- resume ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "batch_index": self.batch_index,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "packing": self.packing,
            "weights": self.weights,
            "domains": list(self.names),
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_domains": self.batch_domains,
        }

    def load_state_dict(self, d: dict) -> None:
        if "batch_index" not in d:
            raise DataError("loader state has no batch_index: the checkpoint is not from a TrainLoader")
        layout = ("batch_index", "rank", "world_size")  # a resume on another number of ranks: see below
        changed = [k for k, v in self.state_dict().items() if k not in layout and k in d and d[k] != v]
        if changed:
            warnings.warn(
                f"train loader resumed with different {', '.join(changed)}: batches differ from the original run",
                stacklevel=2,
            )
        # Every rank has drawn batch_index batches, W of them per index: the run has consumed
        # batch_index * W batches of the global order, whose batch g is rank g % W's index g // W.
        # On W' ranks the same position is index consumed / W' (a step's micro-batches divide by W').
        consumed = int(d["batch_index"]) * int(d.get("world_size", self.world_size))
        if consumed % self.world_size:
            raise DataError(
                f"the checkpoint's data position ({consumed} batches) does not split over {self.world_size} ranks: "
                "resume on a number of ranks that divides train.grad_accum"
            )
        self.batch_index = consumed // self.world_size


def val_batches(
    mix: DomainMix, seq_len: int, batch_size: int, tokens_per_domain: int, domains: list[str] | None = None
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Consecutive windows over the first ``tokens_per_domain`` validation tokens of each domain.

    The last window of a domain is padded (input EOS, target -100, domain -1)
    when the stream runs out; a domain's last batch may have fewer rows.
    """
    if seq_len < 1 or batch_size < 1 or tokens_per_domain < 1:
        raise DataError("val_batches needs seq_len, batch_size and tokens_per_domain >= 1")
    tokens = mix.array("val", "tokens")
    out = []
    for name in mix.select(domains):
        a, b = mix.domain_range("val", name)
        usable = min(tokens_per_domain, b - a - 1)
        if usable < 1:
            continue
        stream = np.asarray(tokens[a : a + usable + 1], dtype=np.int64)
        n_win = math.ceil(usable / seq_len)
        inp = np.full((n_win, seq_len), mix.eos_id, dtype=np.int64)
        tgt = np.full((n_win, seq_len), IGNORE_INDEX, dtype=np.int64)
        dom = np.full((n_win, seq_len), -1, dtype=np.int64)
        for w in range(n_win):
            lo, hi = w * seq_len, min((w + 1) * seq_len, usable)
            inp[w, : hi - lo] = stream[lo:hi]
            tgt[w, : hi - lo] = stream[lo + 1 : hi + 1]
            dom[w, : hi - lo] = mix.domain_id(name)
        for i in range(0, n_win, batch_size):
            sl = slice(i, i + batch_size)
            out.append(
                (
                    name,
                    torch.from_numpy(inp[sl].copy()),
                    torch.from_numpy(tgt[sl].copy()),
                    torch.from_numpy(dom[sl].copy()),
                )
            )
    return out
