"""demo.py: `python demo.py` runs the whole workflow with the real scripts, offline, on images it
makes (train, Ctrl-C, resume, -e, report, class maps, export), and its model learns far above
chance."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import runs
from conftest import ROOT, offline_environment
from report import read_metrics
from util import compute_metrics
from voc import VOC2007, VOC_CLASSES

# The demo's smallest run that still learns with a margin: 100 trainval and 50 test images, four
# epochs, one thread per process (steady on a busy machine), no ONNX export (test_export.py's).
SMALLEST = ["--images", "150", "--epochs", "4", "--threads", "1", "--no-onnx"]


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # loading the TorchScript export
def test_the_demo_runs_every_step_offline_and_learns_far_above_chance(tmp_path):
    folder = tmp_path / "demo"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--dir", str(folder), *SMALLEST],
                          capture_output=True, text=True, env=offline_environment(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out, run, data = done.stdout, folder / "run", str(folder / "voc2007")
    for script in ("main_voc2007.py", "report.py", "predict.py", "export.py"):
        assert f"\n$ python {script} " in out  # each step shown as the command a user types

    # 1-2: the first run was stopped by Ctrl-C after epoch 1 and resumed to the last epoch
    last = run / checkpoints.CHECKPOINT
    assert "epoch 1/4: " in out and f"interrupted; continue with --resume {last}\n" in out
    assert f"resumed from {last} at epoch 1" in out
    records = sorted(read_metrics(run / runs.METRICS_LOG), key=lambda record: record["epoch"])
    assert [record["epoch"] for record in records] == [1, 2, 3, 4]
    assert "--resume" not in records[0]["run"]["command"]
    assert all(f"--resume {last}" in record["run"]["command"] for record in records[1:])
    assert torch.load(last, weights_only=True)["epoch"] == 4

    # 3: -e scored the best checkpoint as training logged it
    best = torch.load(run / checkpoints.BEST, weights_only=True)
    (evaluation,) = read_metrics(run / "eval_test.jsonl")
    assert evaluation["checkpoint"] == str(run / checkpoints.BEST)
    assert evaluation["mAP"] == pytest.approx(records[best["epoch"] - 1]["mAP"], abs=1e-6)

    # 4: the reproduction record, shown and saved
    report = (run / "report.md").read_text()
    assert report.startswith("### DSDL run: VOC 2007, resnet18 at 64 px\n")
    assert "- first command: " in report and report.strip() in out

    # 5: two test images, the class maps of their three most probable classes
    maps = sorted(os.listdir(folder / "class_maps"))
    stems = sorted({name.split("_")[0] for name in maps})
    test_ids = VOC2007(data, "test", download=False).image_ids
    assert len(maps) == 6 and len(stems) == 2 and set(stems) <= set(test_ids)
    assert all(name.endswith(".png") and name.split("_", 1)[1][:-4] in VOC_CLASSES for name in maps)

    # 6: the TorchScript export scores the 20 classes; ONNX was skipped as asked
    scripted = torch.jit.load(str(run / "model.pt"))
    with torch.no_grad():
        assert scripted(torch.zeros(2, 3, 64, 64)).shape == (2, 20)
    assert json.loads((run / "model.pt.classes.json").read_text())["classes"] == list(VOC_CLASSES)
    assert not (run / "model.onnx").exists() and "ONNX export skipped: --no-onnx" in out

    # the mAP it reports is the run's, far above the mAP of random scores on its test images
    learned = records[-1]["mAP"]
    assert f"test mAP {learned:.1f} after 4 epochs" in out
    labels = VOC2007(data, "test", download=False).labels
    rng = np.random.default_rng(0)
    chance = np.mean([compute_metrics(rng.standard_normal(labels.shape), labels)["mAP"] for _ in range(50)])
    print(f"demo: mAP after training {learned:.1f} vs random scores {chance:.1f}")
    assert learned > chance + 20 and learned > 2 * chance, f"mAP {learned:.1f}, random scores {chance:.1f}"
