"""Files of the calibration nodes: writes stay inside output/sageattn2/ whatever the
prefix, reads stay inside it and only take regular, bounded, well-formed calibration
files; saved files are strict JSON."""
import json
import os
import threading

import pytest

from test_nodes_support import load_pack  # noqa: F401  (loads the pack)

from sageattn2_pack.nodes import calibration as cal
from sageattn2_pack.nodes import comfy_nodes
from sageattn2_pack.nodes.override import PatchSettings
from sageattn2_pack.nodes.recording import CalibrationState
from sageattn2_pack.nodes.schedule import ScheduleError

FULL = ("int4+fp8", "int8+fp8", "int4+fp16", "int8+fp16", "exact")


@pytest.fixture
def place(tmp_path, monkeypatch):
    """tmp/output (ComfyUI's output folder) beside tmp/outside (must stay untouched)."""
    (tmp_path / "output").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.json").write_text("{}")
    monkeypatch.setattr(comfy_nodes, "output_directory", lambda: str(tmp_path / "output"))
    return tmp_path


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
                  for f in files + dirs)


def recorded():
    """A recording without a sigma mapping (as from a model without percent_to_sigma)."""
    state = CalibrationState(PatchSettings(backend="reference"))
    rec = state.recorder
    rec.order = FULL
    for step in range(3):
        rec.add("double 0", step, "int8+fp8", 0.9999, 0.01)
        rec.add("double 1", step, "int8+fp8", 0.99, 0.1)
    rec.calls = 6
    return state


def attacks(root):
    return ["../x", "../../x", "sub/../../x", "../outside/x", str(root / "outside" / "x"), "link/x",
            "link/deeper/x", "sub/../link/x", "a\0b/x"]


def test_prefixes_leading_outside_the_output_folder_are_refused(place):
    calib = place / "output" / comfy_nodes.CALIBRATION_DIR
    calib.mkdir()
    os.symlink(place / "outside", calib / "link")  # a link inside output/ pointing elsewhere
    outside_before = tree(place / "outside")
    node = comfy_nodes.SageAttn2CalibrationSchedule()
    for prefix in attacks(place):
        message = node.VALIDATE_INPUTS(filename_prefix=prefix)
        assert isinstance(message, str) and ("leads outside" in message or "NUL" in message), prefix
        with pytest.raises(ValueError, match="leads outside|NUL"):
            node.build(recorded(), {"samples": None}, 0.999, 0.0, prefix)
    assert tree(place / "outside") == outside_before
    assert sorted(os.listdir(place)) == ["output", "outside"]
    assert os.listdir(calib) == ["link"]


@pytest.mark.parametrize("prefix, expected", [
    ("calibration", "calibration_00001.json"),
    ("flux/run", "flux/run_00001.json"),
    ("flux/../run", "run_00001.json"),
    ("./a//b", "a/b_00001.json"),
    ("", "calibration_00001.json"),
])
def test_prefixes_inside_the_output_folder_are_saved_there(place, prefix, expected):
    node = comfy_nodes.SageAttn2CalibrationSchedule()
    assert node.VALIDATE_INPUTS(filename_prefix=prefix) is True
    node.build(recorded(), {"samples": None}, 0.999, 0.0, prefix)
    calib = place / "output" / comfy_nodes.CALIBRATION_DIR
    assert [p for p in tree(calib) if p.endswith(".json")] == [expected.replace("/", os.sep)]
    assert tree(place / "outside") == ["secret.json"]


def test_save_never_replaces_a_file_or_follows_a_link(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "cal_00001.json")
    res = cal.calibrate(recorded().recorder, None, 0.999, None)
    with pytest.raises(FileExistsError):
        cal.save(res, str(tmp_path / "cal_00001.json"))
    assert victim.read_text() == "keep"
    assert cal.next_path(str(tmp_path), "cal").endswith("cal_00002.json")  # numbering skips the link


def test_a_run_without_sigma_mapping_writes_strict_json_and_reads_back(tmp_path):
    res = cal.calibrate(recorded().recorder, None, 0.999, None)
    path = cal.save(res, cal.next_path(str(tmp_path), "cal"))

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    data = json.loads(open(path).read(), parse_constant=refuse)
    assert [s["sigma"] for s in data["steps"]] == [None] * 4
    assert [s["percent_start"] for s in data["steps"]] == pytest.approx([0, 100 / 3, 200 / 3, 100], abs=0.01)
    assert cal.load_schedule_text(path) == res.schedule


def test_the_schedule_node_reads_only_inside_the_output_folder(place):
    calib = place / "output" / comfy_nodes.CALIBRATION_DIR
    calib.mkdir()
    res = cal.calibrate(recorded().recorder, None, 0.999, None)
    cal.save(res, str(place / "outside" / "elsewhere.json"))
    os.symlink(place / "outside" / "elsewhere.json", calib / "link.json")
    os.symlink(place / "outside", calib / "dir")
    cal.save(res, str(calib / "mine.json"))
    assert comfy_nodes.calibration_files() == ["mine.json"]
    node = comfy_nodes.SageAttn2Schedule()
    (schedule,) = node.build("", "mine.json")
    assert schedule.text.startswith("all: ")
    for name in ["link.json", "dir/elsewhere.json", "../outside/elsewhere.json",
                 str(place / "outside" / "elsewhere.json")]:
        with pytest.raises(ValueError, match="leads outside"):
            node.build("", name)


def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("content, words", [
    ({"format": cal.FILE_FORMAT}, "'schedule' is missing"),
    ({"format": cal.FILE_FORMAT, "schedule": None}, "'schedule' is missing"),
    ({"format": cal.FILE_FORMAT, "schedule": 3}, "'schedule' is int"),
    ({"format": cal.FILE_FORMAT, "schedule": ["all: exact"]}, "'schedule' is list"),
    ({"format": "other", "schedule": "all: exact"}, "not a Sage Attention calibration file"),
    ([cal.FILE_FORMAT], "not a Sage Attention calibration file"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"format": "sageattn2-calibration", "schedule": ' + "[" * 100000, "nested too deeply"),
    ("{\"format\": 1" + "1" * 5000 + "}", "cannot read calibration file"),
    (b"\xff\xfe{}", "cannot read calibration file"),
    ("", "cannot read calibration file"),
], ids=["no-schedule", "null-schedule", "int-schedule", "list-schedule", "other-format", "list", "deep-list",
        "deep-schedule", "huge-int", "not-utf8", "empty"])
def test_bad_calibration_files_give_a_clear_value_error(tmp_path, content, words):
    path = tmp_path / "c.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write(path, content)
    with pytest.raises(ValueError, match=words) as e:
        cal.load_schedule_text(str(path))
    assert type(e.value) is ValueError


def test_special_and_oversized_files_are_refused_without_blocking(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            cal.load_schedule_text(str(fifo))
        except ValueError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the old code's open() so the test process can finish
        with open(fifo, "w"):
            pass
        reader.join(10)
        pytest.fail("reading a FIFO blocked")
    assert outcome and "not a regular file" in outcome[0]
    with pytest.raises(ValueError, match="not a regular file"):
        cal.load_schedule_text(str(tmp_path))
    monkeypatch.setattr(cal, "MAX_FILE_BYTES", 100)
    big = write(tmp_path / "big.json", {"format": cal.FILE_FORMAT, "schedule": "all: exact" + " " * 200})
    with pytest.raises(ValueError, match="larger than"):
        cal.load_schedule_text(big)


def test_the_schedule_node_names_the_file_of_a_bad_schedule(place):
    calib = place / "output" / comfy_nodes.CALIBRATION_DIR
    calib.mkdir()
    write(calib / "bad.json", {"format": cal.FILE_FORMAT, "schedule": "double 5-2: exact"})
    write(calib / "nokey.json", {"format": cal.FILE_FORMAT})
    with pytest.raises(ValueError, match=r"in bad\.json: schedule line 1") as e:
        comfy_nodes.SageAttn2Schedule().build("", "bad.json")
    assert not isinstance(e.value, ScheduleError) or "bad.json" in str(e.value)
    with pytest.raises(ValueError, match="no schedule text"):
        comfy_nodes.SageAttn2Schedule().build("", "nokey.json")
