"""quantkit.manifest: typed records all the way down, read and written back exactly."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest

from quantkit.errors import StoreError
from quantkit.manifest import Manifest, ManifestVariant, Projector, Scores, Shard
from quantkit.store import FileRecord
from test_report import make_manifest

REAL = Path(__file__).parent / "data" / "manifest-tiny-budget-run.json"  # written by test_budget's tiny run


@pytest.mark.parametrize("data", [json.loads(REAL.read_text()), make_manifest()], ids=["run", "synthetic-schema-1"])
def test_a_manifest_reads_typed_and_writes_back_exactly(data):
    before = copy.deepcopy(data)
    m = Manifest.from_dict(data)
    assert m.to_dict() == data == before
    assert json.dumps(m.to_dict(), indent=2, sort_keys=True) == json.dumps(before, indent=2, sort_keys=True)
    v = m.variants[0]
    assert isinstance(v, ManifestVariant) and isinstance(v.scores, Scores)
    assert v.id == f"{v.format}:{v.label}"
    assert all(isinstance(r, FileRecord) for r in v.files.values())
    assert isinstance(v.scores.ppl, float) and v.shards == ()
    assert Manifest.coerce(m) is m and Manifest.coerce(data) == m


def test_what_publishing_adds_round_trips():
    data = make_manifest()
    data["variants"][0]["shards"] = [{"file": "a-00001-of-00002.gguf", "size": 10, "sha256": "ab" * 32},
                                     {"file": "a-00002-of-00002.gguf", "size": 5, "sha256": "cd" * 32}]
    data["projectors"] = [{"file": "mmproj-F16.gguf", "type": "F16", "store_file": "mmproj-F16.gguf", "step": "mmproj",
                           "key": "k" * 32, "reused": False, "sha256": "ef" * 32, "size": 3, "architecture": "clip",
                           "projector_type": "gemma3"}]
    m = Manifest.from_dict(data)
    assert m.to_dict() == data
    assert m.variants[0].shards[1] == Shard(file="a-00002-of-00002.gguf", size=5, sha256="cd" * 32)
    assert isinstance(m.projectors[0], Projector) and m.projectors[0].size == 3
    # replacing a frozen record writes what a dict edit would have
    cleared = replace(m, variants=(replace(m.variants[0], file=None, shards=()), *m.variants[1:])).to_dict()
    assert cleared["variants"][0]["file"] is None and "shards" not in cleared["variants"][0]


def test_an_unknown_key_is_refused_by_name():
    data = make_manifest()
    data["variants"][2]["scores"]["kld_mystery"] = 1.0
    with pytest.raises(StoreError, match=r"variants\[2\]\.scores: unknown key 'kld_mystery'"):
        Manifest.from_dict(data)
    data = make_manifest() | {"extra": 1}
    with pytest.raises(StoreError, match="manifest: unknown key 'extra'"):
        Manifest.from_dict(data)
    data = make_manifest()
    data["variants"][0]["files"]["model.gguf"]["md5"] = "x"
    with pytest.raises(StoreError, match=r"variants\[0\]\.files\['model.gguf'\]: unknown key 'md5'"):
        Manifest.from_dict(data)


def test_a_wrong_type_is_refused_by_name():
    data = make_manifest()
    data["variants"][1]["scores"]["ppl"] = "20.1"
    with pytest.raises(StoreError, match=r"variants\[1\]\.scores\.ppl: expected a number, got str"):
        Manifest.from_dict(data)
    data = make_manifest()
    data["variants"][0]["files"]["model.gguf"]["size"] = True
    with pytest.raises(StoreError, match=r"files\['model.gguf'\]\.size: expected an integer, got bool"):
        Manifest.from_dict(data)
    data = make_manifest()
    del data["variants"][0]["format"]
    with pytest.raises(StoreError, match=r"variants\[0\]: lacks 'format'"):
        Manifest.from_dict(data)
