"""Building a mix: split by document, labels, caching, resume, bad input."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest

from moe_testbed.data import build as build_mod
from moe_testbed.data import extract as extract_mod
from moe_testbed.data.build import BuildOptions, build_mix
from moe_testbed.data.errors import DataError
from moe_testbed.data.mix import DomainMix
from moe_testbed.data.packages import Deb, PyPI
from moe_testbed.data.progress import Progress
from moe_testbed.data.sources import SOURCES, Source
from moe_testbed.data.storage import read_manifest
from moe_testbed.data.user import UserSource

from .conftest import small_options, write_folder

QUIET = Progress(quiet=True)


def test_small_mix_meets_budgets_and_splits_by_document(small_mix):
    mix = DomainMix(small_mix)
    assert mix.domains == ["alpha", "digits", "cyr"]
    for d in mix.domains:
        assert mix.tokens("train", d) >= 1500 and mix.tokens("val", d) >= 300
    train = json.loads((small_mix / "train.docs.json").read_text())
    val = json.loads((small_mix / "val.docs.json").read_text())
    train_ids = {(d, s, i) for d, s, i in train}
    val_ids = {(d, s, i) for d, s, i in val}
    assert val_ids and train_ids and not train_ids & val_ids  # no validation document is trained on
    # offsets: one entry per document plus the end, and every document ends with EOS
    for split, docs in (("train", train), ("val", val)):
        offsets = mix.array(split, "docs")
        tokens = mix.array(split, "tokens")
        assert offsets.size == len(docs) + 1 and offsets[-1] == tokens.size
        assert np.all(tokens[offsets[1:] - 1] == mix.eos_id)


def test_every_token_is_labelled_with_its_documents_domain(small_mix):
    mix = DomainMix(small_mix)
    for split in ("train", "val"):
        doms = np.asarray(mix.array(split, "domains"))
        assert doms.dtype == np.uint8 and mix.array(split, "tokens").dtype == np.uint16
        docs = json.loads((small_mix / f"{split}.docs.json").read_text())
        offsets = mix.array(split, "docs")
        for k, (domain, _, _) in enumerate(docs):
            assert np.all(doms[offsets[k] : offsets[k + 1]] == mix.domain_id(domain))
        for d in mix.domains:
            a, b = mix.domain_range(split, d)
            assert np.all(doms[a:b] == mix.domain_id(d))
    # the text of a domain decodes back to that domain's words
    a, b = mix.domain_range("train", "cyr")
    assert "быть" in mix.decode(mix.array("train", "tokens")[a : a + 200])


def test_manifest_records_sources_tokens_and_frequencies(small_mix):
    mix = DomainMix(small_mix)
    m = mix.manifest
    assert m["complete"] and m["vocab_size"] == mix.vocab_size <= 300
    assert [d["name"] for d in m["domains"]] == mix.domains
    assert set(m["sources"]) == {"user:alpha", "user:digits", "user:cyr"}
    assert m["files"]["train.tokens.npy"] and m["tokenizer"]["file"] == "tokenizer.json"
    freq = mix.token_frequencies()
    assert freq.shape == (mix.vocab_size,) and freq.dtype == np.int64
    assert freq.sum() == mix.array("train", "tokens").size


def test_second_build_is_instant(small_mix, user_folders, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a cached build must not extract again")

    monkeypatch.setattr(build_mod, "extract_source", boom)
    assert build_mix(small_options(user_folders), out=small_mix, progress=QUIET) == small_mix


def test_interrupted_build_resumes_from_cached_stages(tmp_path, data_root, user_folders, monkeypatch):
    out = tmp_path / "mix"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "train_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_mix(small_options(user_folders), out=out, progress=QUIET)
    assert read_manifest(out) is None and not (out / "mix.json").exists()
    assert len(list((out / "stages" / "sources").glob("*.meta.json"))) == 3
    monkeypatch.undo()
    monkeypatch.setenv("MOE_TESTBED_DATA", str(data_root))

    def no_read(self, env):
        raise AssertionError("the shards of the interrupted build must be reused")

    monkeypatch.setattr(UserSource, "iter_docs", no_read)
    build_mix(small_options(user_folders), out=out, progress=QUIET)
    assert DomainMix(out).domains == ["alpha", "digits", "cyr"]


def test_changed_settings_rebuild_and_reuse_shards(small_mix, user_folders, monkeypatch):
    calls = []
    real = extract_mod.extract_source

    def spy(src, *a, **k):
        calls.append(src.name)
        return real(src, *a, **k)

    monkeypatch.setattr(build_mod, "extract_source", spy)
    build_mix(small_options(user_folders, vocab_size=280), out=small_mix, progress=QUIET)
    assert DomainMix(small_mix).manifest["tokenizer"]["requested_vocab_size"] == 280
    assert calls  # consulted, but the shards were big enough: nothing re-read
    assert all(json.loads(p.read_text())["cap_bytes"] for p in (small_mix / "stages" / "sources").glob("*.meta.json"))


def test_all_user_formats_folder_jsonl_parquet(tmp_path, data_root, user_folders):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .conftest import make_docs

    jsonl = tmp_path / "digits.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"id": f"n{i}", "text": t}) for i, t in enumerate(make_docs("digits", 30, 120, 5))) + "\n"
    )
    parquet = tmp_path / "cyr.parquet"
    pq.write_table(pa.table({"text": make_docs("cyr", 30, 120, 6)}), parquet)
    opts = small_options({"alpha": user_folders["alpha"], "nums": jsonl, "russian": parquet})
    out = build_mix(opts, out=tmp_path / "formats", progress=QUIET)
    assert DomainMix(out).domains == ["alpha", "nums", "russian"]


def test_default_out_is_the_preset_cache_or_a_named_sibling(data_root, user_folders):
    plan = build_mod.make_plan(BuildOptions(preset="tiny"))
    assert build_mod.default_out(plan) == data_root / "tiny"
    custom = build_mod.make_plan(small_options(user_folders))
    assert build_mod.default_out(custom).parent == data_root
    assert build_mod.default_out(custom).name.startswith("tiny-")


# ---- bad input: one-line DataError, nothing marked complete ----------------------


def _fails(opts, out, match):
    with pytest.raises(DataError, match=match) as exc:
        build_mix(opts, out=out, progress=QUIET)
    assert "\n" not in str(exc.value)
    assert read_manifest(out) is None


def test_missing_and_empty_domains(tmp_path, data_root, user_folders):
    _fails(small_options({"x": tmp_path / "nope"}), tmp_path / "o1", "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(small_options({"x": tmp_path / "empty"}), tmp_path / "o2", "domain x has no documents")
    (tmp_path / "bad.txt").write_text("x")
    _fails(small_options({"x": tmp_path / "bad.txt"}), tmp_path / "o3", "neither a folder")
    _fails(BuildOptions(domains=["klingon"]), tmp_path / "o4", "unknown domain 'klingon'")
    _fails(BuildOptions(domains=[]), tmp_path / "o5", "no domains")


def test_domain_too_small_for_the_budget(tmp_path, data_root, user_folders):
    small = write_folder(tmp_path / "small", "alpha", n_docs=3, words_per_doc=30)
    _fails(small_options({**user_folders, "small": small}), tmp_path / "o", "domain small is too small")


def test_non_utf8_is_counted_or_refused(tmp_path, data_root, user_folders):
    folder = shutil.copytree(user_folders["alpha"], tmp_path / "latin1")
    (folder / "latin1.txt").write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 40)
    opts = small_options({"latin1": folder, "digits": user_folders["digits"]})
    out = build_mix(opts, out=tmp_path / "ok", progress=QUIET)
    src = DomainMix(out).manifest["sources"]["user:latin1"]["extracted"]
    assert src["bad_chars"] == 80 and src["docs_with_bad_chars"] == 1
    _fails(
        small_options({"latin1": folder}, encoding_errors="strict"),
        tmp_path / "strict",
        "latin1.txt is not valid UTF-8",
    )


class _NeedsMissingDeb(Source):
    name, domain, licence = "test_missing_deb", "test_missing", "test"
    packages = (Deb("moe-testbed-no-such-package", mode="install"),)


class _NeedsBadArtifact(Source):
    name, domain, licence = "test_bad_artifact", "test_bad", "test"
    packages = (PyPI("moe-testbed-fake", "1.0", "moe_testbed_fake-1.0.tar.gz", "0" * 64),)


class _Empty(Source):
    name, domain, licence = "test_empty", "test_empty", "test"

    def iter_docs(self, env):
        return iter(())


@pytest.fixture
def fake_sources(monkeypatch):
    from moe_testbed.data import presets

    monkeypatch.setitem(SOURCES, _Empty.name, _Empty)
    monkeypatch.setitem(presets.OPTIONAL_DOMAINS, "test_empty", (_Empty.name,))
    monkeypatch.setitem(SOURCES, _NeedsMissingDeb.name, _NeedsMissingDeb)
    monkeypatch.setitem(SOURCES, _NeedsBadArtifact.name, _NeedsBadArtifact)
    monkeypatch.setitem(presets.OPTIONAL_DOMAINS, "test_missing", (_NeedsMissingDeb.name,))
    monkeypatch.setitem(presets.OPTIONAL_DOMAINS, "test_bad", (_NeedsBadArtifact.name,))


def test_missing_package_fails_with_the_command_or_is_skipped(tmp_path, data_root, user_folders, fake_sources):
    opts = small_options(user_folders, domains=["test_missing"], install="never", on_missing="fail")
    _fails(opts, tmp_path / "o", "moe-testbed-no-such-package is not installed.*apt-get install")
    opts.on_missing = "skip"
    out = build_mix(opts, out=tmp_path / "skip", progress=QUIET)
    assert DomainMix(out).domains == ["alpha", "digits", "cyr"]


def test_empty_builtin_domain_fails_or_is_skipped(tmp_path, data_root, user_folders, fake_sources):
    opts = small_options(user_folders, domains=["test_empty"], on_missing="fail")
    _fails(opts, tmp_path / "o", "domain test_empty has no documents")
    opts.on_missing = "skip"
    assert DomainMix(build_mix(opts, out=tmp_path / "skip", progress=QUIET)).domains == ["alpha", "digits", "cyr"]


def test_checksum_mismatch_is_an_error(tmp_path, data_root, user_folders, fake_sources):
    artifact = data_root / "_downloads" / "artifacts" / "moe_testbed_fake-1.0.tar.gz"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"not the pinned file")
    opts = small_options(user_folders, domains=["test_bad"], install="never", on_missing="skip")
    _fails(opts, tmp_path / "o", "checksum mismatch for .*moe_testbed_fake-1.0.tar.gz: expected sha256 0000")


def test_full_disk_leaves_no_complete_mix(tmp_path, data_root, user_folders, monkeypatch):
    from moe_testbed.data import storage

    real = storage.atomic_write

    def full(path, write):
        if str(path).endswith("val.tokens.npy"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(storage, "atomic_write", full)
    _fails(small_options(user_folders), tmp_path / "o", "disk full while writing .*val.tokens.npy")
    assert not list((tmp_path / "o").glob(".*.tmp"))
