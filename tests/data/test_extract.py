"""Document selection and the per-source shard cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moe_testbed.data.extract import extract_source, read_meta, read_shard
from moe_testbed.data.sources import Doc, Source, SourceEnv, doc_key

TEXTS = {f"d{i:02d}": f"document {i} " + "x" * (20 + i) for i in range(40)}
TEXTS["dup"] = TEXTS["d05"]  # the same text under another id
TEXTS["tiny"] = "too short"


class RandomAccess(Source):
    name, domain, licence, min_chars = "ra_test", "t", "test", 15
    reads: list[str] = []

    def list_docs(self, env):
        return sorted(TEXTS)

    def read_doc(self, env, doc_id):
        self.reads.append(doc_id)
        return Doc(doc_id, TEXTS[doc_id])


class Streaming(Source):
    name, domain, licence, min_chars = "ra_test", "t", "test", 15  # same name: the same keys

    def iter_docs(self, env) -> Iterator[Doc]:
        for doc_id in reversed(sorted(TEXTS)):
            yield Doc(doc_id, TEXTS[doc_id])


def _ids(stage, name="ra_test"):
    return [d["id"] for d in read_shard(stage, name)]


@pytest.mark.parametrize("cap", [10**9, 300, 1])
def test_random_access_and_streaming_keep_the_same_documents(tmp_path, cap):
    a = extract_source(RandomAccess(), SourceEnv(), tmp_path / "a", cap)
    b = extract_source(Streaming(), SourceEnv(), tmp_path / "b", cap)
    assert _ids(tmp_path / "a") == _ids(tmp_path / "b")
    assert a["documents"] == b["documents"] and a["complete"] == b["complete"] == (cap == 10**9)


def test_selection_is_key_ordered_unique_and_long_enough(tmp_path):
    meta = extract_source(Streaming(), SourceEnv(), tmp_path, 10**9)
    ids = _ids(tmp_path)
    assert ids == sorted(ids, key=lambda i: doc_key("ra_test", i))
    assert "tiny" not in ids and meta["skipped_short"] == 1
    assert ("dup" in ids) != ("d05" in ids) and meta["duplicates"] == 1
    keep = min(["dup", "d05"], key=lambda i: doc_key("ra_test", i))
    assert keep in ids  # the copy with the smaller key is kept


def test_a_smaller_cap_reads_a_prefix_of_a_larger_one(tmp_path):
    extract_source(Streaming(), SourceEnv(), tmp_path / "big", 10**9)
    small = extract_source(Streaming(), SourceEnv(), tmp_path / "small", 250)
    assert small["bytes"] >= 250
    assert _ids(tmp_path / "small") == _ids(tmp_path / "big")[: small["documents"]]


def test_random_access_stops_reading_at_the_cap(tmp_path):
    RandomAccess.reads = []
    extract_source(RandomAccess(), SourceEnv(), tmp_path, 200)
    assert 0 < len(RandomAccess.reads) < len(TEXTS)


def test_shard_is_cached_and_reextracted_when_too_small_or_stale(tmp_path):
    RandomAccess.reads = []
    first = extract_source(RandomAccess(), SourceEnv(), tmp_path, 200)
    n = len(RandomAccess.reads)
    assert extract_source(RandomAccess(), SourceEnv(), tmp_path, 150) == first  # smaller budget: cached
    assert len(RandomAccess.reads) == n
    bigger = extract_source(RandomAccess(), SourceEnv(), tmp_path, 10**9)  # larger budget: extracted again
    assert bigger["complete"] and len(RandomAccess.reads) > n

    class Changed(RandomAccess):
        version = 2  # changed cleaning code invalidates the shard

    RandomAccess.reads = []
    extract_source(Changed(), SourceEnv(), tmp_path, 200)
    assert RandomAccess.reads


def test_interrupted_extraction_leaves_no_meta_and_is_redone(tmp_path):
    class Failing(RandomAccess):
        def read_doc(self, env, doc_id):
            if doc_id == "d10":
                raise KeyboardInterrupt
            return super().read_doc(env, doc_id)

    with pytest.raises(KeyboardInterrupt):
        extract_source(Failing(), SourceEnv(), tmp_path, 10**9)
    assert read_meta(tmp_path, "ra_test") is None
    assert extract_source(RandomAccess(), SourceEnv(), tmp_path, 10**9)["complete"]
