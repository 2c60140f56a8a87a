"""data/identity.py: a built mix says whether it is the mix a preset's published numbers come from."""

import copy
import io
import json

from moe_testbed.data.identity import differences, identity, identity_line, reference_identity
from moe_testbed.data.info import print_info
from moe_testbed.data.mix import DomainMix


def test_the_presets_ship_a_reference_identity():
    for preset in ("default", "tiny"):
        ref = reference_identity(preset)
        assert len(ref["fingerprint"]) == 16 and ref["domains"] and ref["packages"]
    assert len(reference_identity("default")["domains"]) == 12


def test_a_mix_matches_its_own_identity_and_names_what_differs(tiny_data_dir):
    manifest = json.loads((tiny_data_dir / "mix.json").read_text())
    ref = identity(manifest)
    assert differences(manifest, ref) == []
    assert "matches" in identity_line(manifest, None)[0] or "no reference" in identity_line(manifest, None)[0]
    other = copy.deepcopy(ref)
    other["fingerprint"] = "0" * 16
    name = manifest["domains"][0]["name"]
    other["domains"][name]["documents"]["train"] += 6
    src = next(s for s, v in manifest["sources"].items() if v.get("resolved"))
    other["packages"][src] = ["somepkg 0.1"]
    diff = differences(manifest, other)
    assert any(d.startswith(f"domain {name}: ") and "train documents (reference:" in d for d in diff)
    assert any(d.startswith(f"source {src}: ") and "(reference: somepkg 0.1)" in d for d in diff)


def test_data_info_prints_the_identity(tiny_data_dir):
    out = io.StringIO()
    print_info(DomainMix(tiny_data_dir), out=out, plain=True)
    text = out.getvalue()
    fp = DomainMix(tiny_data_dir).fingerprint
    assert f"mix fingerprint {fp}" in text
    assert "matches the tiny reference" in text or "differs from the tiny reference" in text
