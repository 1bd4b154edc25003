"""Further files of a version (tokenizer, validation report): copied, hashed, verified."""

from __future__ import annotations

import stat
from pathlib import Path

import orjson
import pytest

from appliance.errors import ModelError
from appliance.manifest import Manifest, verify_file
from appliance.registry import Registry


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def test_extra_files_are_copied_hashed_and_read_only(reg, samples, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    # a complete text declaration: models add checks it (the steps' refusal)
    pre = {"type": "text", "tokenizer": "notes.txt", "max_length": 8,
           "inputs": {"input_ids": "input"}}  # fmt: skip
    mv = reg.add("s", samples / "sample.onnx", extra_files={"notes.txt": notes}, preprocess=pre,
                 parameters={"build": {"x": 1}})  # fmt: skip
    m = mv.manifest
    assert m.files == {
        "notes.txt": {
            "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "size": 5,
        }
    }
    assert m.preprocess == pre and m.parameters["build"] == {"x": 1}
    assert (mv.directory / "notes.txt").read_text() == "hello"
    assert not (mv.directory / "notes.txt").stat().st_mode & stat.S_IWUSR
    assert reg.get("s", "1").manifest == m  # survives the JSON round trip
    verify_file(mv.file, m)
    # a changed extra file is refused like a changed model file
    (mv.directory).chmod(0o755)
    (mv.directory / "notes.txt").chmod(0o644)
    (mv.directory / "notes.txt").write_text("HELLO")
    with pytest.raises(ModelError, match=r"notes\.txt: sha256 .* does not match"):
        verify_file(mv.file, m)
    (mv.directory / "notes.txt").unlink()
    with pytest.raises(ModelError, match=r"cannot read .*notes\.txt"):
        verify_file(mv.file, m)


@pytest.mark.parametrize("name", ["../x", "a/b", "manifest.json", "model.onnx", ""])
def test_bad_extra_file_names_are_refused(reg, samples, tmp_path, name):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ModelError):
        reg.add("s", samples / "sample.onnx", extra_files={name: f})
    assert reg.names() == []


def test_missing_extra_source_is_refused(reg, samples, tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        reg.add("s", samples / "sample.onnx", extra_files={"t.json": tmp_path / "absent"})


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"../t.json": {"sha256": "0", "size": 1}}, "'files' must name plain file names"),
        ({"model.onnx": {"sha256": "0", "size": 1}}, "repeats the model file"),
        ({"t.json": {"size": 1}}, "must be an object with a string 'sha256'"),
        ({"t.json": {"sha256": "0", "size": -1}}, "must have an integer 'size'"),
        (["t.json"], "'files' must be an object"),
    ],
)
def test_bad_files_in_a_manifest(reg, samples, files, message):
    mv = reg.add("s", samples / "sample.onnx")
    obj = orjson.loads((mv.directory / "manifest.json").read_bytes())
    obj["files"] = files
    with pytest.raises(ModelError) as info:
        Manifest.from_json(obj, "m.json")
    assert message in info.value.message
