"""Train and validation batches: shapes, labels, determinism, resume, weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_testbed.data.errors import DataError
from moe_testbed.data.loader import TrainLoader, val_batches
from moe_testbed.data.mix import DomainMix
from moe_testbed.data.sampling import parse_weights

S, B = 32, 6


@pytest.fixture
def mix(small_mix) -> DomainMix:
    return DomainMix(small_mix)


def _contains(stream: np.ndarray, window: np.ndarray) -> bool:
    views = np.lib.stride_tricks.sliding_window_view(stream, window.size)
    return bool(np.any(np.all(views == window, axis=1)))


def test_batch_shapes_and_shifted_targets(mix):
    x, y, d = TrainLoader(mix, S, B, seed=0).next_batch()
    for t in (x, y, d):
        assert t.shape == (B, S) and t.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_domain_packing_rows_come_from_their_labelled_domain(mix):
    tokens = np.asarray(mix.array("train", "tokens"), dtype=np.int64)
    loader = TrainLoader(mix, S, B, seed=1)
    for _ in range(3):
        x, y, d = loader.next_batch()
        for row in range(B):
            dom = int(d[row, 0])
            assert torch.all(d[row] == dom)  # one domain per sequence
            a, b = mix.domain_range("train", mix.domains[dom])
            window = np.concatenate([x[row].numpy(), y[row, -1:].numpy()])
            assert _contains(tokens[a:b], window)


def test_mixed_packing_labels_follow_documents(mix):
    tokens = np.asarray(mix.array("train", "tokens"), dtype=np.int64)
    doms = np.asarray(mix.array("train", "domains"), dtype=np.int64)
    loader = TrainLoader(mix, 64, 8, seed=2, packing="mixed")
    changes = 0
    for _ in range(5):
        x, y, d = loader.next_batch()
        for row in range(8):
            for s in range(1, 64):
                if d[row, s] != d[row, s - 1]:
                    changes += 1
                    assert x[row, s - 1] == mix.eos_id  # domains change only after an EOS
            # every contiguous same-domain piece is a stretch of that domain's stream
            starts = [0] + [s for s in range(1, 64) if x[row, s - 1] == mix.eos_id] + [64]
            for lo, hi in zip(starts, starts[1:]):
                if hi > lo:
                    piece = x[row, lo:hi].numpy()
                    a, b = mix.domain_range("train", mix.domains[int(d[row, lo])])
                    assert _contains(tokens[a:b], piece)
                    assert np.all(doms[a:b][0] == d[row, lo].item())
    assert changes > 0


def test_loader_is_a_pure_function_of_seed_index_and_rank(mix):
    a = TrainLoader(mix, S, B, seed=7)
    first = [a.next_batch() for _ in range(4)]
    b = TrainLoader(mix, S, B, seed=7)
    b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))  # JSON-serialisable
    c = TrainLoader(mix, S, B, seed=7)
    c.load_state_dict(state)
    for want in first[1:]:
        got = c.next_batch()
        assert all(torch.equal(u, v) for u, v in zip(got, want))
    other_seed = TrainLoader(mix, S, B, seed=8).next_batch()
    assert not torch.equal(other_seed[0], first[0][0])


def test_ranks_get_different_batches(mix):
    r0 = TrainLoader(mix, S, B, seed=0, rank=0, world_size=2).next_batch()[0]
    r1 = TrainLoader(mix, S, B, seed=0, rank=1, world_size=2).next_batch()[0]
    single = TrainLoader(mix, S, B, seed=0).next_batch()[0]
    assert not torch.equal(r0, r1)
    assert torch.equal(r0, single)  # rank 0 of 2 takes global batches 0, 2, 4, ...
    with pytest.raises(DataError):
        TrainLoader(mix, S, B, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_a_resume_on_another_number_of_ranks_continues_the_global_order(mix, before, after):
    # An uninterrupted single process draws global batches 0, 1, 2, ...; batch g of W ranks is
    # rank g % W's local index g // W. After 2 batches per rank on `before` ranks, `after` ranks
    # must continue at global batch 2 * before.
    order = [b[0] for b in (TrainLoader(mix, S, B, seed=3).batch_at(g) for g in range(8))]
    old = [TrainLoader(mix, S, B, seed=3, rank=r, world_size=before) for r in range(before)]
    for loader in old:
        loader.next_batch(), loader.next_batch()
    state = old[0].state_dict()
    for r in range(after):
        new = TrainLoader(mix, S, B, seed=3, rank=r, world_size=after)
        new.load_state_dict(state)
        assert torch.equal(new.next_batch()[0], order[2 * before + r])
    odd = TrainLoader(mix, S, B, seed=3, rank=0, world_size=3)
    with pytest.raises(DataError, match=r"does not split over 3 ranks"):
        odd.load_state_dict(state)


def _domain_counts(loader, n=40):
    counts = np.zeros(3)
    for _ in range(n):
        counts += np.bincount(loader.next_batch()[2][:, 0].numpy(), minlength=3)
    return counts


def test_balanced_zipf_and_named_weights(mix):
    balanced = _domain_counts(TrainLoader(mix, 4, 16, seed=0))
    assert balanced.min() > 0.25 * balanced.sum()
    zipf = _domain_counts(TrainLoader(mix, 4, 16, seed=0, weights="zipf:2"))
    assert zipf[0] > zipf[1] > zipf[2]
    named = _domain_counts(TrainLoader(mix, 4, 16, seed=0, weights="alpha=0,cyr=3"))
    assert named[0] == 0 and named[2] > 2 * named[1]
    np.testing.assert_allclose(parse_weights("zipf", ["a", "b"]), [2 / 3, 1 / 3])
    for bad in ("zipf:x", "klingon=1", "alpha=-1", "alpha=0,digits=0,cyr=0", "nonsense"):
        with pytest.raises(DataError):
            parse_weights(bad, mix.domains)


def test_domain_subset_keeps_global_ids(mix):
    loader = TrainLoader(mix, S, B, seed=0, domains=["cyr"])
    assert set(loader.next_batch()[2].unique().tolist()) == {mix.domain_id("cyr")} == {2}
    with pytest.raises(DataError, match="not a domain"):
        TrainLoader(mix, S, B, seed=0, domains=["klingon"])


def test_val_batches_cover_each_domain_with_padding(mix):
    batches = val_batches(mix, seq_len=50, batch_size=4, tokens_per_domain=230)
    names = [b[0] for b in batches]
    assert names == ["alpha", "alpha", "digits", "digits", "cyr", "cyr"]  # 5 windows: 4 + 1 rows
    name, x, y, d = batches[1]
    assert x.shape == (1, 50)
    assert torch.all(y[0, 30:] == -100) and torch.all(d[0, 30:] == -1)  # 230 = 4*50 + 30
    assert torch.all(d[0, :30] == 0) and torch.equal(x[0, 1:30], y[0, :29])
    again = val_batches(mix, seq_len=50, batch_size=4, tokens_per_domain=230)
    assert all(torch.equal(u, v) for a, b in zip(batches, again) for u, v in zip(a[1:], b[1:]))
    val = np.asarray(mix.array("val", "tokens"))
    a, _ = mix.domain_range("val", "alpha")
    assert np.array_equal(batches[0][1][0].numpy(), val[a : a + 50])


def test_sequence_longer_than_a_domain_is_an_error(mix):
    with pytest.raises(DataError, match="fewer than seq_len"):
        TrainLoader(mix, 10**6, 2, seed=0)


def test_microbatch_domains_fixes_the_domains_of_each_batch(mix):
    loader = TrainLoader(mix, 8, 6, seed=0, batch_domains=2)
    for _ in range(10):
        _, _, d = loader.next_batch()
        per_row = d[:, 0]
        assert len(set(per_row.tolist())) == 2 and (d == per_row[:, None]).all()
    single = TrainLoader(mix, 8, 4, seed=0, batch_domains=1).next_batch()[2]
    assert len(set(single.reshape(-1).tolist())) == 1
    with pytest.raises(DataError, match="microbatch_domains=4 must be in 1..3"):
        TrainLoader(mix, 8, 4, seed=0, batch_domains=4)
