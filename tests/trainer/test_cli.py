"""`kubetune train` failures: one line, a termination message, an exit code; never a traceback."""
import json

import pytest

import tiny
from proc import TrainerProc

pytestmark = pytest.mark.slow


def test_bad_data_and_bad_config_exit_cleanly(tmp_path, model_dir):
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(20), {4: "{not json", 12: '{"instruction": "x"}'})
    bad_data = TrainerProc(tiny.trainer_config(tmp_path, model_dir, data), tmp_path / "a.yaml")
    assert bad_data.wait(300) == 3
    term = json.loads(bad_data.termination.read_text())
    assert term["reason"] == "BadData"
    assert f"file://{data}: line 4: invalid JSON" in term["message"] and "line 12: missing field 'output'" in term["message"]
    assert "Traceback" not in bad_data.stderr
    assert [l for l in bad_data.stderr.splitlines() if l.startswith("kubetune train: BadData: 2 malformed lines")]

    cfg = tiny.trainer_config(tmp_path, model_dir, data)
    cfg["spec"]["training"]["schedulr"] = "linear"
    bad_cfg = TrainerProc(cfg, tmp_path / "b.yaml")
    assert bad_cfg.wait(120) == 2
    term = json.loads(bad_cfg.termination.read_text())
    assert term["reason"] == "BadConfig" and "spec.training.schedulr: unknown field" in term["message"]
    assert "Traceback" not in bad_cfg.stderr


def test_skip_bad_lines_counts_them(tmp_path, model_dir):
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(30), {4: "{not json", 12: "[]"})
    cfg = tiny.trainer_config(tmp_path, model_dir, data, dataset={"onBadLine": "skip"}, training={"maxSteps": 3})
    run = TrainerProc(cfg, tmp_path / "c.yaml")
    assert run.wait(300) == 0, run.stderr[-2000:]
    term = json.loads(run.termination.read_text())
    assert term["reason"] == "Completed" and term["result"]["metrics"]["skippedLines"] == 2


def test_a_broken_model_exits_cleanly_naming_the_file(tmp_path, model_dir):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": }')
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(20))
    run = TrainerProc(tiny.trainer_config(tmp_path, broken, data), tmp_path / "m.yaml")
    assert run.wait(300) == 4
    term = json.loads(run.termination.read_text())
    assert term["reason"] == "ModelLoadFailed"
    assert term["message"] == f"file://{broken}/config.json: invalid JSON at line 2 column 18: Expecting value"
    assert "Traceback" not in run.stderr
    assert f"kubetune train: ModelLoadFailed: {term['message']}" in run.stderr.splitlines()
