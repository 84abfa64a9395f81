"""weights_manifest.json: the nine models of docs/architectures.md#the-ensemble, and malformed entries rejected by entry and field."""
import copy
import json

import pytest

from kernel.errors import KernelError
from kernel.models import build_model, load_manifest, select, validate_manifest
from kernel.demo.weights import REPO_MANIFEST, preset_entries

SPEC_NAMES = [
    "dolg_effnet_b5_768", "dolg_effnet_b6_768", "dolg_effnet_b7_448_s1", "hybrid_b3_swin224_896",
    "hybrid_b5_swin224_448_s1", "hybrid_b6_swin384_384", "effnet_b3_768", "effnet_b6_512", "effnet_b5_704",
]


def test_repo_manifest_has_the_nine_models():
    entries = load_manifest(REPO_MANIFEST)
    assert [e["name"] for e in entries] == SPEC_NAMES
    by = {e["name"]: e for e in entries}
    assert by["dolg_effnet_b7_448_s1"]["stem_stride"] == 1 and by["dolg_effnet_b7_448_s1"]["dilations"] == [3, 6, 9]
    assert by["hybrid_b6_swin384_384"]["feature_level"] == 1
    assert [e["name"] for e in select(entries, track="recognition")] == SPEC_NAMES[:8]
    assert [e["name"] for e in select(entries, track="retrieval")] == SPEC_NAMES[:6] + SPEC_NAMES[7:]
    assert sorted(e["priority"] for e in entries) == list(range(1, 10))


@pytest.mark.parametrize("field, value, message", [
    ("family", "resnet", "field 'family' must be one of"),
    ("image_size", "768", "field 'image_size' must be int"),
    ("stem_stride", 3, "field 'stem_stride' must be 1 or 2"),
    ("tracks", ["detection"], "field 'tracks'"),
    ("dilations", [1, 2], "field 'dilations'"),
    ("sha256", "abc", "field 'sha256'"),
    ("checkpoint", "../x.pth", "field 'checkpoint'"),
    ("colour", "red", "field 'colour' is not a known"),
])
def test_malformed_entry_names_entry_and_field(field, value, message):
    data = json.loads(REPO_MANIFEST.read_text())
    data["models"][0][field] = value
    with pytest.raises(KernelError, match=f"model 'dolg_effnet_b5_768': {message}"):
        validate_manifest(data, "weights_manifest.json")


def test_missing_field_and_duplicates(tmp_path):
    data = json.loads(REPO_MANIFEST.read_text())
    del data["models"][3]["embedder"]
    with pytest.raises(KernelError, match="model 'hybrid_b3_swin224_896': field 'embedder' is missing"):
        validate_manifest(data)
    data = json.loads(REPO_MANIFEST.read_text())
    data["models"].append(copy.deepcopy(data["models"][0]))
    with pytest.raises(KernelError, match="appears more than once"):
        validate_manifest(data)
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    with pytest.raises(KernelError, match="m.json: not valid JSON"):
        load_manifest(bad)


def test_unknown_model_in_selection():
    with pytest.raises(KernelError, match="unknown model 'dolg_b9'"):
        select(load_manifest(REPO_MANIFEST), "dolg_b9")


def test_hybrid_geometry_must_land_on_the_token_grid():
    entry = copy.deepcopy(next(e for e in preset_entries("tiny") if e["family"] == "hybrid"))
    entry["image_size"] += 32
    with pytest.raises(KernelError, match="token grid"):
        build_model(entry)


def test_ensemble_table_is_the_repository_manifest():
    """kernel.models.manifest.ENSEMBLE (used by the rehearsal and the synthetic stores) = weights_manifest.json."""
    import json

    from kernel.models.manifest import ENSEMBLE
    from tests.conftest import ROOT

    entries = json.loads((ROOT / "weights_manifest.json").read_text())["models"]
    assert [(e["name"], e["family"], tuple(e["tracks"])) for e in entries] == list(ENSEMBLE)


def test_an_older_manifest_with_group_loads_and_says_it_is_ignored(tmp_path, caplog):
    """'group' was required once and read by nothing (recognition averages by family): an older manifest still
    loads, the same as today's, with one logged note."""
    import logging

    data = json.loads(REPO_MANIFEST.read_text())
    assert not any("group" in e for e in data["models"])
    for e in data["models"]:
        e["group"] = e["family"]
    old = tmp_path / "weights_manifest.json"
    old.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="kernel.models.manifest"):
        entries = load_manifest(old)
    assert entries == load_manifest(REPO_MANIFEST)
    notes = [r.getMessage() for r in caplog.records if "group" in r.getMessage()]
    assert notes == [f"{old}: field 'group' is no longer used (recognition averages descriptors by 'family'); ignored"]


def test_every_field_the_validator_knows_is_documented():
    """The module docstring's field tables name every field validate_entry accepts, and only those."""
    from kernel.models import manifest

    fields = {*manifest._COMMON, *manifest._OPTIONAL}
    fields |= {f for family in manifest._FAMILY_FIELDS.values() for f in family}
    table = [line.strip().split("  ")[0] for line in manifest.__doc__.splitlines() if line.startswith("    ")]
    documented = {name.strip() for row in table for name in row.split("/")}
    assert documented == fields
    assert all(f"``{f}``" in manifest.__doc__ for f in manifest.RETIRED)
