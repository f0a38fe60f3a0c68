"""bench/throughput.py (img/s of the ImageNet family, runners side by side): a short run on the
tiny preset writes every row it measured, and refuses what it cannot run. The authors' runner
needs their code (``--authors``), which is not in the repository: it is not run here."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput",
                                                  ROOT / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_json_holds_measured_rows(tmp_path, capsys):
    throughput = load_throughput()
    out = tmp_path / "throughput.json"
    t0 = time.perf_counter()
    rc = throughput.main(["--preset", "tiny-16x", "--batch", "2", "--steps", "1", "--repeats",
                          "2", "--warmup", "1", "--device", "cpu", "--dtype", "float32",
                          "--json", str(out)])
    wall = time.perf_counter() - t0
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    assert doc["config"]["runners"] == ["reference", "torch"] and doc["config"]["authors"] is None
    assert doc["machine"]["device"] == "cpu" and doc["machine"]["threads"] >= 1
    (result,) = doc["results"]
    assert result["preset"] == "tiny-16x" and result["complete"] is True
    assert (result["batch"], result["steps"], result["dtype"]) == (2, 1, "float32")
    assert result["architecture"]["parallel_num"] == 16 and result["guidance"] > 1
    rows = result["rows"]
    assert list(rows) == ["reference", "torch"]
    measured = 0.0
    for name, row in rows.items():
        assert row["runner"] == name and row["batch"] == 2
        assert row["runs"] == 2 and len(row["seconds"]) == 2 and row["images"] == 4
        assert all(isinstance(s, float) and s > 0 for s in row["seconds"]), row
        measured += sum(row["seconds"])
        assert row["median_s"] == pytest.approx(sorted(row["seconds"])[0] / 2
                                                + sorted(row["seconds"])[1] / 2)
        assert row["img_per_s"] == pytest.approx(2 / row["median_s"]) and row["img_per_s"] > 0
        assert row["ratio_to_authors"] is None and row["ratio_to_reference"] > 0
        assert row["same_every_run"] is True
    # every number is a time of this run: together they fit in its wall clock
    assert measured < wall
    assert rows["reference"]["ratio_to_reference"] == 1.0
    assert rows["torch"]["ratio_to_reference"] == pytest.approx(
        rows["torch"]["img_per_s"] / rows["reference"]["img_per_s"])
    # on the CPU in float32 the two backends give the same images, bit for bit
    assert rows["torch"]["identical_to_reference"] == {"values": 1.0, "images": 2, "of": 2}
    assert result["exact_expected"] is True and result["exact"] is True
    printed = capsys.readouterr().out
    assert "runner" in printed and "img/s" in printed and "/ authors" in printed
    assert "bit for bit (CPU, float32; PyTorch runners): every image identical" in printed


@pytest.mark.parametrize("argv,words", [
    (["--runners", "authors,torch"], "needs --authors"),
    (["--runners", "torch,onnx"], "--runners takes"),
    (["--preset", "imagenet-b-2x"], "unknown preset"),
    (["--batch", "0"], "--batch"),
])
def test_throughput_refuses_what_it_cannot_run(argv, words, capsys):
    throughput = load_throughput()
    with pytest.raises(SystemExit) as e:
        throughput.parse_args(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err
