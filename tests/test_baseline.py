"""The paper's baseline row is a model of this project: `--model baseline` trains, resumes,
evaluates, predicts with class maps, exports and loads through torch.hub like DSDL, with no
class vectors; and it learns far above chance (DSDL does in tests/test_demo.py)."""
import json
import os

import numpy as np
import pytest
import torch

import checkpoints
import export
import hubconf
import main_voc2007
import predict
import report
import runs
from conftest import SMALL, call_main, write_voc_tree
from models import Baseline
from report import read_metrics, results_table
from util import DSDLError, compute_metrics, eval_transform, load_image
from voc import VOC2007, VOC_CLASSES


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    """Two epochs of a baseline on the tiny VOC tree, offline and without class vectors."""
    root = tmp_path_factory.mktemp("baseline")
    data = str(root / "voc2007")
    write_voc_tree(data, splits={"trainval": 24, "test": 16}, seed=5)
    folder = root / "run"
    argv = [data, *SMALL, "--model", "baseline", "--checkpoint-dir", str(folder), "--epochs", "2"]
    assert call_main(main_voc2007.main, argv) == 0
    return data, folder


def test_a_baseline_checkpoint_holds_its_linear_layer_and_no_class_vectors(baseline_run):
    _, folder = baseline_run
    state = torch.load(folder / checkpoints.CHECKPOINT, weights_only=True)
    assert state["args"]["model"] == "baseline" and state["epoch"] == 2
    assert "semantics" not in state and "W1" not in state["model"]
    assert state["model"]["fc.weight"].shape == (20, 512) and state["model"]["fc.bias"].shape == (20,)
    assert read_metrics(folder / runs.METRICS_LOG)[-1]["settings"]["model"] == "baseline"


def test_evaluate_a_baseline_checkpoint_gives_its_logged_map_and_loss(baseline_run, capsys):
    data, folder = baseline_run
    best = folder / checkpoints.BEST
    logged = {r["epoch"]: r for r in read_metrics(folder / runs.METRICS_LOG)}
    epoch = torch.load(best, weights_only=True)["epoch"]
    # neither --model nor --arch given: both come from the checkpoint
    argv = [data, "-e", "--resume", str(best), "--device", "cpu", "-j", "0", "-b", "8"]
    assert call_main(main_voc2007.main, argv) == 0
    (record,) = read_metrics(folder / "eval_test.jsonl")
    assert record["mAP"] == pytest.approx(logged[epoch]["mAP"], abs=1e-6)
    assert record["loss"] == pytest.approx(logged[epoch]["loss"], rel=1e-5)
    assert "ResNet baseline resnet18" in capsys.readouterr().out


def test_resuming_a_baseline_continues_it(baseline_run, tmp_path):
    data, folder = baseline_run
    argv = [data, *SMALL, "--resume", str(folder / checkpoints.CHECKPOINT), "--epochs", "3",
            "--checkpoint-dir", str(tmp_path / "branch")]
    assert call_main(main_voc2007.main, argv) == 0
    state = torch.load(tmp_path / "branch" / checkpoints.CHECKPOINT, weights_only=True)
    assert state["epoch"] == 3 and state["args"]["model"] == "baseline"


def test_predict_export_and_hub_score_a_baseline_as_the_model_does(baseline_run, tmp_path):
    data, folder = baseline_run
    best = str(folder / checkpoints.BEST)
    model = Baseline(20, arch="resnet18", pretrained=False)
    model.load_state_dict(torch.load(best, weights_only=True)["model"])
    image = os.path.join(data, "VOCdevkit", "VOC2007", "JPEGImages",
                         sorted(os.listdir(os.path.join(data, "VOCdevkit", "VOC2007", "JPEGImages")))[0])
    tensor = eval_transform(64)(load_image(image)).unsqueeze(0)
    with torch.no_grad():
        expected = model.eval()(tensor).scores[0]
    out = tmp_path / "out.json"
    assert predict.main([image, "--resume", best, "--threshold", "0", "--json", str(out),
                         "--cam", str(tmp_path / "maps"), "-j", "0", "--device", "cpu"]) == 0
    (result,) = json.loads(out.read_text())
    by_label = {p["label"]: p["score"] for p in result["predictions"]}
    np.testing.assert_allclose([by_label[name] for name in VOC_CLASSES], expected, rtol=1e-4, atol=1e-5)
    assert len(os.listdir(tmp_path / "maps")) == 20  # one class map per class listed
    exported = tmp_path / "baseline.pt"
    assert export.main(["--resume", best, "--format", "torchscript", "-o", str(exported)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(exported))(tensor)[0], expected, rtol=1e-4, atol=1e-5)
    sidecar = json.loads((tmp_path / "baseline.pt.classes.json").read_text())
    assert sidecar["model"] == "baseline" and "lambd" not in sidecar
    hub = hubconf.baseline(best)
    with torch.no_grad():
        torch.testing.assert_close(hub(tensor).scores[0], expected)
    with pytest.raises(DSDLError, match="entry point 'baseline'"):
        hubconf.dsdl(best)


def test_zero_shot_labels_need_a_dsdl_checkpoint(baseline_run, tmp_path, capsys):
    data, folder = baseline_run
    vectors = tmp_path / "new.npy"
    np.save(vectors, np.ones((1, 300), dtype=np.float32))
    assert predict.main([data, "--resume", str(folder / checkpoints.BEST), "--classes", "zebra",
                         "--embeddings", str(vectors), "--device", "cpu"]) == 1
    assert "--classes needs a DSDL checkpoint" in capsys.readouterr().err


def test_dsdl_options_given_for_a_baseline_are_refused_not_ignored(baseline_run, capsys):
    data, folder = baseline_run
    best = str(folder / checkpoints.BEST)
    assert predict.main([data, "--resume", best, "--lambd", "1", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (f"error: {best} is a baseline model, which has no class "
                                       f"vectors and no lambda: --lambd is for DSDL checkpoints; "
                                       f"leave it out\n")


def test_the_papers_baseline_row_is_shown_next_to_a_baseline_in_the_papers_setting():
    metrics = {"AP": [90.0] * 20, "mAP": 91.0}
    table = results_table(metrics, list(VOC_CLASSES), "voc2007", ("baseline", "resnet101", 448, "test"))
    assert "| ResNet baseline paper |" + " – |" * 20 + " 89.9 |" in table
    assert table.splitlines()[-3].endswith("| +1.1 |")  # the difference, on mAP only
    assert "DSDL paper" not in table
    coco = results_table({"mAP": 70.0, **{k: 1.0 for k in report.THRESHOLDED},
                          **{k + "_top3": 1.0 for k in report.THRESHOLDED}},
                         [f"c{i}" for i in range(80)], "coco2014", ("baseline", "resnet101", 448, "val"))
    assert "| ResNet baseline paper | 77.3 |" in coco
    assert "ResNet baseline paper" not in results_table(
        metrics, list(VOC_CLASSES), "voc2007", ("baseline", "resnet18", 448, "test"))


# The baseline's plain linear head learns at a tenth of the rate that DSDL's dictionary takes
# from random weights (demo.py's --lr 0.1, the old learning test's 0.3), fastest with the classic
# global average pooling. DSDL's own learning is asserted the same way by tests/test_demo.py, on
# the demo's run of the real scripts.
def test_the_baseline_learns_visually_distinct_classes_far_above_chance(tmp_path):
    root = str(tmp_path / "voc")
    write_voc_tree(root, splits={"trainval": 80, "test": 40}, seed=3)
    argv = [root, *SMALL, "--model", "baseline", "--checkpoint-dir", str(tmp_path / "ck"),
            "--epochs", "6", "--lr", "0.03", "--lrp", "1", "--pool", "avg", "-b", "16"]
    assert call_main(main_voc2007.main, argv) == 0
    learned = read_metrics(tmp_path / "ck" / runs.METRICS_LOG)[-1]["mAP"]
    labels = VOC2007(root, "test", download=False).labels
    rng = np.random.default_rng(0)
    chance = np.mean([compute_metrics(rng.standard_normal(labels.shape), labels)["mAP"] for _ in range(50)])
    print(f"baseline: mAP after training {learned:.1f} vs random scores {chance:.1f}")
    assert learned > chance + 20 and learned > 2 * chance, f"mAP {learned:.1f}, random scores {chance:.1f}"
