"""The model store on disk: Registry, atomic_write, the manifest and its checks (real files)."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance.errors import ModelError, NotFound
from appliance.manifest import MANIFEST_NAME, Manifest, sha256_file, verify_file
from appliance.registry import ACTIVE_NAME, Registry, atomic_write, check_name, describe
from appliance.tensors import Signature, TensorSpec


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hidden(directory: Path) -> list[str]:
    """Leftovers of a staging, trash or temp file: every dot-entry of a directory."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def make_writable(directory: Path) -> None:
    """Undo the store's read-only bits so a test can tamper with a version (or delete it)."""
    directory.chmod(0o755)
    for p in directory.iterdir():
        p.chmod(0o644)


def bad_model(tmp_path: Path) -> Path:
    path = tmp_path / "x.onnx"
    path.write_text("this is not a model\n")
    return path


# -- add ---------------------------------------------------------------------------------------


def test_add_copies_the_file_and_writes_the_manifest(reg: Registry, samples: Path) -> None:
    source = samples / "sample.onnx"
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    mv = reg.add("sample", source)
    after = dt.datetime.now(dt.timezone.utc)

    assert mv.directory == reg.root / "sample" / "1"
    assert mv.file == mv.directory / "model.onnx"
    assert sorted(p.name for p in mv.directory.iterdir()) == [MANIFEST_NAME, "model.onnx"]
    data = source.read_bytes()
    assert mv.file.read_bytes() == data  # a copy, not a link or a move
    assert source.is_file() and not mv.file.is_symlink()

    m = mv.manifest
    assert (m.name, m.version, m.backend, m.file) == ("sample", "1", "onnx", "model.onnx")
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert m.size == len(data)
    assert m.source == str(source.resolve())
    created = dt.datetime.fromisoformat(m.created_at)
    assert created.tzinfo is not None
    assert before <= created <= after
    # read from the model itself, not from the file name
    assert m.signature.inputs == (TensorSpec("input", "FP32", (-1, 4)),)
    assert m.signature.outputs == (
        TensorSpec("probabilities", "FP32", (-1, 3)),
        TensorSpec("label", "INT64", (-1,)),
    )
    assert m.parameters == {"producer": "appliance-build"}

    # what is on disk is what add returned, and the store reads it back the same
    on_disk = orjson.loads((mv.directory / MANIFEST_NAME).read_bytes())
    assert on_disk == m.to_json()
    assert on_disk["schema"] == 1
    assert reg.get("sample", "1") == mv
    assert reg.active("sample") == mv
    assert reg.names() == ["sample"]


@pytest.mark.parametrize(
    ("name", "inputs", "outputs"),
    [
        (
            "multi_io",
            [("x", "FP32", [-1, 3]), ("y", "INT64", [-1, 3]), ("pixels", "UINT8", [-1, 2, 2])],
            [
                ("sum", "FP32", [-1, 3]),
                ("y_times_2", "INT64", [-1, 3]),
                ("x_positive", "BOOL", [-1, 3]),
                ("pixel_mean", "INT32", [-1]),
            ],
        ),
        ("strings", [("text", "BYTES", [-1])], [("echo", "BYTES", [-1])]),
        ("fp16", [("a", "FP16", [-1, 2])], [("doubled", "FP16", [-1, 2])]),
    ],
)
def test_add_reads_inputs_and_outputs_from_the_model(
    reg: Registry, samples: Path, name: str, inputs: list[Any], outputs: list[Any]
) -> None:
    m = reg.add(name, samples / f"{name}.onnx").manifest
    on_disk = orjson.loads((reg.root / name / "1" / MANIFEST_NAME).read_bytes())
    for key, want in (("inputs", inputs), ("outputs", outputs)):
        got = [(t["name"], t["datatype"], t["shape"]) for t in on_disk[key]]
        assert got == [tuple(w) for w in want]
    assert [t.name for t in m.signature.inputs] == [w[0] for w in inputs]


def test_backend_is_inferred_from_the_file_whatever_its_suffix_case(
    reg: Registry, samples: Path, tmp_path: Path
) -> None:
    upper = tmp_path / "Upper.ONNX"
    shutil.copyfile(samples / "sample.onnx", upper)
    mv = reg.add("upper", upper)
    assert mv.manifest.backend == "onnx"
    assert mv.manifest.file == "model.onnx"


def test_default_versions_count_up_from_the_highest_number(reg: Registry, samples: Path) -> None:
    source = samples / "sample.onnx"
    assert [reg.add("m", source).manifest.version for _ in range(3)] == ["1", "2", "3"]
    entry = reg.entry("m")
    assert entry.versions == ("1", "2", "3")
    assert entry.active == "3"
    assert entry.history == ("2", "1")
    # explicit versions: a number moves the counter on, a name does not count
    assert reg.add("m", source, version="10").manifest.version == "10"
    assert reg.add("m", source, version="beta").manifest.version == "beta"
    assert reg.add("m", source).manifest.version == "11"
    # numbers sort as numbers, names after them
    assert reg.versions("m") == ["1", "2", "3", "10", "11", "beta"]


def test_explicit_version(reg: Registry, samples: Path) -> None:
    mv = reg.add("m", samples / "sample.onnx", version="2024-06.rc1")
    assert mv.directory == reg.root / "m" / "2024-06.rc1"
    assert reg.entry("m").active == "2024-06.rc1"


def test_adding_an_existing_version_is_refused(reg: Registry, samples: Path) -> None:
    first = reg.add("m", samples / "sample.onnx", version="1")
    with pytest.raises(ModelError, match=r"version '1' already exists: versions never change"):
        reg.add("m", samples / "fp16.onnx", version="1")
    again = reg.get("m", "1")
    assert again == first
    assert sha256_file(again.file) == (first.manifest.sha256, first.manifest.size)
    assert hidden(reg.root / "m") == []


def test_add_without_activating(reg: Registry, samples: Path) -> None:
    reg.add("m", samples / "sample.onnx", activate=False)
    entry = reg.entry("m")
    assert (entry.active, entry.versions) == (None, ("1",))
    assert not (reg.root / "m" / ACTIVE_NAME).exists()
    with pytest.raises(NotFound, match="has no active version"):
        reg.active("m")
    reg.add("m", samples / "sample.onnx")
    reg.add("m", samples / "sample.onnx", activate=False)
    entry = reg.entry("m")
    assert (entry.active, entry.history, entry.versions) == ("2", (), ("1", "2", "3"))


def test_versions_are_read_only_once_written(reg: Registry, samples: Path) -> None:
    mv = reg.add("m", samples / "sample.onnx")
    assert mode(mv.directory) == 0o555
    for f in mv.directory.iterdir():
        assert mode(f) == 0o444, f
    # the store itself and ACTIVE stay writable (and readable by a server run as another user)
    assert mode(reg.root / "m") & stat.S_IWUSR
    assert mode(reg.root / "m" / ACTIVE_NAME) == 0o644


def test_a_file_that_cannot_be_inspected_leaves_nothing_behind(
    reg: Registry, samples: Path, tmp_path: Path
) -> None:
    bad = bad_model(tmp_path)
    # a new model: no staging dir, and not even an empty model directory
    with pytest.raises(ModelError, match="onnxruntime cannot load this model") as info:
        reg.add("bad", bad)
    assert str(bad) in info.value.message  # names the user's file ...
    assert ".partial" not in info.value.message  # ... not the staging copy
    assert not (reg.root / "bad").exists()
    assert reg.names() == []

    # an existing model: its versions and ACTIVE are untouched
    reg.add("m", samples / "sample.onnx")
    with pytest.raises(ModelError):
        reg.add("m", bad)
    with pytest.raises(ModelError):
        reg.add("m", bad, version="7")
    assert hidden(reg.root / "m") == []
    entry = reg.entry("m")
    assert (entry.active, entry.versions) == ("1", ("1",))
    assert reg.add("m", samples / "sample.onnx").manifest.version == "2"


def test_add_refuses_missing_and_unknown_files(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        reg.add("m", tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="no such file"):
        reg.add("m", tmp_path)  # a directory is not a model file
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="cannot tell the model format"):
        reg.add("m", other)
    gguf = tmp_path / "llm.onnx"
    gguf.write_bytes(b"GGUF\x03\0\0\0" + b"\0" * 16)
    with pytest.raises(ModelError, match=r"not a GGUF model: general\.architecture is missing"):
        reg.add("m", gguf)
    assert not reg.root.exists() or reg.names() == []


# -- activate, rollback, remove ----------------------------------------------------------------


def test_activate(reg: Registry, samples: Path) -> None:
    for _ in range(3):
        reg.add("m", samples / "sample.onnx")
    reg.activate("m", "1")
    entry = reg.entry("m")
    assert (entry.active, entry.history) == ("1", ("3", "2"))
    reg.activate("m", "1")  # already active: nothing changes
    assert reg.entry("m").history == ("3", "2")
    reg.activate("m", "2")  # each version appears once, newest first
    entry = reg.entry("m")
    assert (entry.active, entry.history) == ("2", ("1", "3"))
    assert reg.active("m").manifest.version == "2"


def test_activate_refuses_an_unknown_version(reg: Registry, samples: Path) -> None:
    reg.add("m", samples / "sample.onnx")
    before = (reg.root / "m" / ACTIVE_NAME).read_bytes()
    with pytest.raises(NotFound, match="model 'm' has no version '9'"):
        reg.activate("m", "9")
    with pytest.raises(NotFound):
        reg.activate("nope", "1")
    assert (reg.root / "m" / ACTIVE_NAME).read_bytes() == before


def test_rollback_walks_back_through_the_history(reg: Registry, samples: Path) -> None:
    for _ in range(3):
        reg.add("m", samples / "sample.onnx")
    assert reg.rollback("m") == "2"
    assert reg.entry("m").active == "2"
    assert reg.rollback("m") == "1"
    entry = reg.entry("m")
    assert (entry.active, entry.history) == ("1", ())
    with pytest.raises(ModelError, match="no earlier version to roll back to"):
        reg.rollback("m")
    assert reg.entry("m").active == "1"


def test_rollback_refuses_without_an_active_version(reg: Registry, samples: Path) -> None:
    reg.add("m", samples / "sample.onnx", activate=False)
    with pytest.raises(ModelError, match="no active version to roll back from"):
        reg.rollback("m")


def test_rollback_skips_removed_versions(reg: Registry, samples: Path) -> None:
    for _ in range(4):
        reg.add("m", samples / "sample.onnx")
    reg.remove("m", "3")  # through the registry: history is updated at once
    assert reg.entry("m").history == ("2", "1")
    # behind the registry's back: ACTIVE still names version 2, which is gone
    gone = reg.root / "m" / "2"
    make_writable(gone)
    shutil.rmtree(gone)
    assert reg.entry("m").history == ("2", "1")
    assert reg.rollback("m") == "1"
    entry = reg.entry("m")
    assert (entry.active, entry.history, entry.versions) == ("1", (), ("1", "4"))


def test_remove(reg: Registry, samples: Path) -> None:
    for _ in range(3):
        reg.add("m", samples / "sample.onnx")
    reg.activate("m", "2")  # history: 3, 1
    reg.remove("m", "3")
    assert not (reg.root / "m" / "3").exists()
    entry = reg.entry("m")
    assert (entry.active, entry.history, entry.versions) == ("2", ("1",), ("1", "2"))
    assert hidden(reg.root / "m") == []  # no trash and no temp file left
    reg.remove("m", "1")
    assert (reg.root / "m" / ACTIVE_NAME).read_text() == "2\n"
    with pytest.raises(ModelError, match="no earlier version"):
        reg.rollback("m")


def test_remove_refuses_the_active_version(reg: Registry, samples: Path) -> None:
    reg.add("m", samples / "sample.onnx")
    reg.add("m", samples / "sample.onnx")
    with pytest.raises(ModelError, match="version '2' is active"):
        reg.remove("m", "2")
    assert reg.entry("m").versions == ("1", "2")
    assert reg.active("m").file.is_file()


def test_remove_refuses_unknown_versions_and_models(reg: Registry, samples: Path) -> None:
    reg.add("m", samples / "sample.onnx")
    with pytest.raises(NotFound, match="model 'm' has no version '5'"):
        reg.remove("m", "5")
    with pytest.raises(NotFound, match="model 'other' is not in the store"):
        reg.remove("other", "1")


# -- names -------------------------------------------------------------------------------------

BAD_NAMES = ["../x", ".hidden", "a/b", "", "ACTIVE", "a..b", "-dash", "sp ace", "x" * 129, "a\n"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_model_names_are_refused(reg: Registry, samples: Path, bad: str) -> None:
    with pytest.raises(ModelError) as info:
        reg.add(bad, samples / "sample.onnx")
    assert info.value.message.startswith(f"invalid model name {bad!r}: use 1-128 letters")
    for call in (reg.entry, reg.active, reg.rollback):
        with pytest.raises(ModelError, match="invalid model name"):
            call(bad)
    assert not reg.root.exists() or list(reg.root.iterdir()) == []


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_versions_are_refused(reg: Registry, samples: Path, bad: str) -> None:
    with pytest.raises(ModelError) as info:
        reg.add("m", samples / "sample.onnx", version=bad)
    assert info.value.message.startswith(f"invalid version {bad!r}")
    assert not (reg.root / "m").exists()  # refused before anything is written
    reg.add("m", samples / "sample.onnx")
    for call in (reg.get, reg.activate, reg.remove):
        with pytest.raises(ModelError, match="invalid version"):
            call("m", bad)
    assert reg.entry("m").versions == ("1",)


def test_valid_names() -> None:
    for good in ("a", "A1", "resnet-50_int8.v2", "1", "x" * 128):
        assert check_name(good, "model name") == good


def test_names_and_versions_at_the_limit_are_stored(reg: Registry, samples: Path) -> None:
    name, version = "n" * 128, "v" * 128
    reg.add(name, samples / "sample.onnx", version=version)
    assert reg.names() == [name]
    assert reg.active(name).manifest.version == version


def test_listing_ignores_what_is_not_a_model_or_version(reg: Registry, samples: Path) -> None:
    reg.add("m", samples / "sample.onnx")
    (reg.root / ".cache" / "tensorrt").mkdir(parents=True)
    (reg.root / "README.md").write_text("notes")
    (reg.root / "m" / "9").mkdir()  # no manifest: not a version
    (reg.root / "m" / ".7.abc.partial").mkdir()
    assert reg.names() == ["m"]
    assert reg.versions("m") == ["1"]
    with pytest.raises(NotFound, match="model 'm' has no version '9'"):
        reg.get("m", "9")
    assert Registry(reg.root / "nothing-here").names() == []
    with pytest.raises(NotFound, match="is not in the store"):
        reg.versions("nope")


# -- ACTIVE ------------------------------------------------------------------------------------


def test_active_file_format(reg: Registry, samples: Path) -> None:
    for _ in range(3):
        reg.add("m", samples / "sample.onnx")
    path = reg.root / "m" / ACTIVE_NAME
    assert path.read_text() == "3\n2\n1\n"
    reg.activate("m", "1")
    assert path.read_text() == "1\n3\n2\n"
    reg.rollback("m")
    assert path.read_text() == "3\n2\n"


def test_active_file_written_by_hand_is_read_leniently(reg: Registry, samples: Path) -> None:
    reg.add("m", samples / "sample.onnx", activate=False)
    reg.add("m", samples / "sample.onnx", activate=False)
    (reg.root / "m" / ACTIVE_NAME).write_text("  2 \n\n1")
    entry = reg.entry("m")
    assert (entry.active, entry.history) == ("2", ("1",))
    assert reg.active("m").manifest.version == "2"


def test_active_naming_a_missing_version_is_not_found(reg: Registry, samples: Path) -> None:
    reg.add("m", samples / "sample.onnx")
    (reg.root / "m" / ACTIVE_NAME).write_text("8\n1\n")
    with pytest.raises(NotFound, match="has no version '8'"):
        reg.active("m")
    assert reg.rollback("m") == "1"


# -- manifest ----------------------------------------------------------------------------------


def rewrite_manifest(mv_dir: Path, **changes: Any) -> None:
    make_writable(mv_dir)
    path = mv_dir / MANIFEST_NAME
    obj = orjson.loads(path.read_bytes())
    obj.update(changes)
    path.write_bytes(orjson.dumps(obj))


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"name": "other"}, "manifest says 'other' version '1', but it lives at m/1"),
        ({"version": "2"}, "manifest says 'm' version '2', but it lives at m/1"),
    ],
)
def test_a_manifest_that_disagrees_with_its_directory_is_refused(
    reg: Registry, samples: Path, changes: dict[str, str], says: str
) -> None:
    mv = reg.add("m", samples / "sample.onnx")
    rewrite_manifest(mv.directory, **changes)
    with pytest.raises(ModelError) as info:
        reg.get("m", "1")
    assert says in info.value.message
    assert str(mv.directory / MANIFEST_NAME) in info.value.message
    with pytest.raises(ModelError):
        reg.active("m")
    with pytest.raises(ModelError):
        reg.activate("m", "1")


def test_unreadable_manifests_are_refused(reg: Registry, samples: Path) -> None:
    mv = reg.add("m", samples / "sample.onnx")
    path = mv.directory / MANIFEST_NAME
    make_writable(mv.directory)
    path.write_text("{not json")
    with pytest.raises(ModelError, match="manifest is not valid JSON"):
        reg.get("m", "1")
    path.write_text("[1, 2]")
    with pytest.raises(ModelError, match="manifest must be a JSON object"):
        reg.get("m", "1")
    path.write_text('{"name": "m"}')
    with pytest.raises(ModelError, match="invalid manifest"):
        reg.get("m", "1")


def manifest_json(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schema": 1,
        "name": "m",
        "version": "1",
        "backend": "onnx",
        "file": "model.onnx",
        "sha256": "0" * 64,
        "size": 3,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}],
        "created_at": "2024-01-01T00:00:00+00:00",
        "source": "/somewhere/m.onnx",
        "parameters": {"producer": "test"},
    }
    obj.update(changes)
    return obj


def test_manifest_round_trips_through_json() -> None:
    obj = manifest_json()
    m = Manifest.from_json(obj, "here")
    assert m.to_json() == obj
    assert m.signature == Signature(
        (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "INT64", (-1,)),)
    )
    # optional fields may be missing
    bare = {k: v for k, v in obj.items() if k not in ("created_at", "source", "parameters")}
    m = Manifest.from_json(bare, "here")
    assert (m.created_at, m.source, m.parameters) == ("", "", {})


@pytest.mark.parametrize(
    "file", ["a/b", "../model.onnx", "/etc/passwd", "sub/", "", ".", "..", "./model.onnx"]
)
def test_manifest_file_must_be_a_plain_file_name(file: str) -> None:
    with pytest.raises(ModelError) as info:
        Manifest.from_json(manifest_json(file=file), "where.json")
    assert info.value.message == (
        f"where.json: manifest 'file' must be a plain file name, got {file!r}"
    )


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]}, "unknown datatype"),
        ({"size": "big"}, "invalid literal"),
        ({"outputs": [{"name": "y", "datatype": "FP32", "shape": ["n"]}]}, "invalid literal"),
        ({"inputs": None}, "NoneType"),
    ],
)
def test_manifest_with_bad_fields_is_refused(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ModelError, match=r"where\.json: invalid manifest") as info:
        Manifest.from_json(manifest_json(**changes), "where.json")
    assert fragment in info.value.message
    obj = manifest_json()
    del obj["sha256"]
    with pytest.raises(ModelError, match="invalid manifest: 'sha256'"):
        Manifest.from_json(obj, "where.json")


def test_manifest_read_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"cannot read manifest .*No such file"):
        Manifest.read(tmp_path / MANIFEST_NAME)


# -- verification ------------------------------------------------------------------------------


def test_verify_file_accepts_an_untouched_file(reg: Registry, samples: Path) -> None:
    mv = reg.add("m", samples / "sample.onnx")
    verify_file(mv.file, mv.manifest)


def test_a_file_whose_sha256_changed_is_refused(reg: Registry, samples: Path) -> None:
    mv = reg.add("m", samples / "sample.onnx")
    make_writable(mv.directory)
    data = bytearray(mv.file.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    mv.file.write_bytes(bytes(data))
    with pytest.raises(ModelError) as info:
        verify_file(mv.file, mv.manifest)
    msg = info.value.message
    assert msg.startswith("model 'm' version 1: refusing to load")
    assert "does not match the manifest" in msg
    assert hashlib.sha256(bytes(data)).hexdigest() in msg
    assert mv.manifest.sha256 in msg
    assert "modified or corrupted" in msg


def test_a_truncated_or_missing_file_is_refused(reg: Registry, samples: Path) -> None:
    mv = reg.add("m", samples / "sample.onnx")
    make_writable(mv.directory)
    mv.file.write_bytes(mv.file.read_bytes()[:-10])
    with pytest.raises(ModelError, match=rf"\({mv.manifest.size - 10} bytes\) does not match"):
        verify_file(mv.file, mv.manifest)
    mv.file.unlink()
    with pytest.raises(ModelError, match=r"cannot read .*No such file"):
        verify_file(mv.file, mv.manifest)


def test_sha256_file_reads_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == (hashlib.sha256(data).hexdigest(), len(data))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == (hashlib.sha256(b"").hexdigest(), 0)


# -- atomic_write and describe -----------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "ACTIVE"
    atomic_write(path, b"1\n")
    assert path.read_bytes() == b"1\n"
    atomic_write(path, b"2\n1\n")
    assert path.read_bytes() == b"2\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ACTIVE"]
    assert mode(path) == 0o644


def test_atomic_write_that_fails_keeps_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "ACTIVE"
    atomic_write(path, b"1\n")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ACTIVE"]


def test_describe(reg: Registry, samples: Path) -> None:
    m = reg.add("m", samples / "sample.onnx").manifest
    assert describe(m.signature) == (
        "input:FP32[-1, 4] -> probabilities:FP32[-1, 3], label:INT64[-1]"
    )
