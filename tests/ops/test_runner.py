"""ops.runner: the opening and closing steps every operation shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec, NotFound, OutputExists, PathOutsideDataDir
from adapter_surgery.ops.common import PathFields, RunContext
from adapter_surgery.ops.runner import begin, begin_output, open_input


def spec(checkpoint: str = "model", output: str = "out", overwrite: bool = False) -> PathFields:
    return PathFields(checkpoint=checkpoint, output=output, overwrite=overwrite)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path


def test_begin_resolves_and_checks_the_paths(data: Path) -> None:
    run = begin(spec(), RunContext(data))
    assert (run.checkpoint, run.output, run.overwrite) == (data / "model", data / "out", False)
    with pytest.raises(NotFound) as e:  # a missing input is found when it is opened
        begin(spec(checkpoint="missing"), RunContext(data)).open()
    assert e.value.field == "checkpoint"
    with pytest.raises(PathOutsideDataDir) as e:
        begin(spec(output="../elsewhere"), RunContext(data))
    assert e.value.field == "output"
    with pytest.raises(InvalidSpec) as e:
        begin(spec(output="model/inside"), RunContext(data))
    assert e.value.field == "output"
    (data / "out").mkdir()
    with pytest.raises(OutputExists):
        begin(spec(), RunContext(data))
    assert begin(spec(overwrite=True), RunContext(data)).overwrite is True


def test_writing_is_atomic_and_owned(data: Path) -> None:
    run = begin(spec(), RunContext(data, owner="job-1"))
    with pytest.raises(RuntimeError), run.writing() as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("fails half way")
    assert sorted(p.name for p in data.iterdir()) == ["model"]  # nothing half-written left
    with run.writing() as tmp:
        tmp.mkdir()
        (tmp / "done").write_text("x")
    assert (data / "out" / "done").read_text() == "x"
    assert run.seconds() >= 0


def test_begin_output_checks_every_input(data: Path) -> None:
    with pytest.raises(InvalidSpec) as e:
        begin_output(RunContext(data), "model/sub", False, [data / "out", data / "model"])
    assert e.value.field == "output"
    run = begin_output(RunContext(data), "out", False, [data / "model"])
    assert run.checkpoint is None and run.output == data / "out"


def test_open_input_names_its_field(data: Path) -> None:
    (data / "broken.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(InvalidCheckpoint) as e:
        open_input(RunContext(data), "broken.safetensors", "patched")
    assert e.value.field == "patched"
    with pytest.raises(NotFound) as e:
        open_input(RunContext(data), "nothing", "patched")
    assert e.value.field == "patched"


@pytest.mark.parametrize(("entries", "replaceable"), [
    ({}, True),  # an empty directory
    ({"config.json": "{}", "model.safetensors": "x"}, True),  # a checkpoint
    ({"adapter_config.json": "{}", "base/model.safetensors": "x"}, True),  # an adapter (PiSSA: with its base)
    ({"model.safetensors": "x"}, True),  # bare weights
    ({"notes.txt": "x", "run-1/config.json": "{}", "run-2/config.json": "{}"}, False),  # a folder of models
    ({"README.md": "x"}, False),
], ids=["empty", "checkpoint", "adapter", "weights", "folder-of-models", "other-files"])
def test_overwrite_replaces_an_output_never_a_folder_of_other_things(data: Path, entries: dict[str, str],
                                                                      replaceable: bool) -> None:
    """``"output": "models", "overwrite": true`` (meant: models/run-3) replaced a whole folder of models (200)."""
    for name, text in entries.items():
        (data / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (data / "out" / name).write_text(text)
    (data / "out").mkdir(exist_ok=True)
    if replaceable:
        assert begin(spec(overwrite=True), RunContext(data)).overwrite is True
        return
    with pytest.raises(InvalidSpec) as e:
        begin(spec(overwrite=True), RunContext(data))
    assert e.value.field == "output" and "holds no checkpoint or adapter" in e.value.detail
    with pytest.raises(OutputExists):  # without overwrite: the usual 409
        begin(spec(), RunContext(data))
