"""bench.py and the GPU command: exact GPU peaks, figures that survive a failed step, and a run
that cannot pass without a GPU."""
import argparse
import json
import os
import sys

import pytest
import torch

import bench
import distributed
import engine
import options
from conftest import ROOT

TINY = ["--device", "cpu", "--arch", "resnet18", "--image-size", "32", "-b", "2", "--steps", "1",
        "--warmup", "1", "--rounds", "1", "--pipeline-images", "2"]


@pytest.mark.parametrize("name, sheet, bf16", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5),  # not the SXM card whose name it contains
    ("NVIDIA H200", "H200 SXM", 989.5),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe", 312.0),
    ("NVIDIA L40S", "L40S", 362.05),
    ("L40S", "L40S", 362.05),  # without the vendor's prefix, as some drivers report it
])
def test_a_gpu_gets_the_peaks_of_its_own_data_sheet(monkeypatch, name, sheet, bf16):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    found, peaks = bench.gpu_peaks(torch.device("cuda"))
    assert found == sheet and peaks["bf16"] == bf16
    assert peaks["fp32"] < peaks["tf32"] < peaks["bf16"]
    assert f"{name!r} is the {sheet} of the data sheets" in bench.peaks_line(name, found, peaks)


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA L40", "NVIDIA A10", "NVIDIA H100",
                                  "NVIDIA H100 NVL 2"])
def test_a_gpu_not_in_the_table_gets_no_mfu_and_says_so(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    found, peaks = bench.gpu_peaks(torch.device("cuda"))
    assert (found, peaks) == ("unknown: MFU not computed", None)
    assert bench.peaks_line(name, found, peaks).endswith("not in bench.py's table: unknown: MFU not computed")


def test_each_figure_is_written_when_measured_and_a_failed_step_keeps_the_others(
        tmp_path, monkeypatch, capsys):
    path = tmp_path / "bench.json"

    def broken_evaluation(*args, **kwargs):  # the 2nd model figure of every configuration fails
        raise RuntimeError("evaluation failed")

    def broken_pipelines(folder, image_size):
        raise RuntimeError("nvJPEG: decode failed")

    seen = {}
    count_flops = bench.forward_flops

    def reading_flops(*args):  # what the JSON file holds while a later step runs
        seen.update(json.loads(path.read_text()))
        return count_flops(*args)

    monkeypatch.setattr(engine, "evaluate", broken_evaluation)
    monkeypatch.setattr(bench, "measure_pipelines", broken_pipelines)
    monkeypatch.setattr(bench, "forward_flops", reading_flops)
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, "--json", str(path)])
    with pytest.raises(SystemExit) as exit:
        bench.main()
    assert str(exit.value.code).startswith("error: 3 step(s) failed, the others were measured")
    # training, measured before the failure, is kept in both configurations
    assert seen["train_img_s_release"] > 0 and seen["train_img_s_fast"] > 0
    assert seen["errors"] == {"release": "RuntimeError: evaluation failed",
                              "fast": "RuntimeError: evaluation failed"}
    figures = json.loads(path.read_text())
    assert figures["errors"]["pipelines"] == "RuntimeError: nvJPEG: decode failed"
    assert "eval_img_s_release" not in figures and "pipeline_img_s_fast" not in figures
    assert figures["forward_gflop_per_image"] > 0  # the steps after the failures ran
    assert set(figures["pipeline_fast_breakdown_ms"]) == {"JPEG decode (torchvision)",
                                                          "resize, crop + resize, flip (uint8)"}
    assert os.listdir(tmp_path) == ["bench.json"]  # written whole each time, no temporary left
    assert "step pipelines failed (RuntimeError: nvJPEG: decode failed)" in capsys.readouterr().err


def test_bench_with_require_gpu_and_no_gpu_exits_with_one_error_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--require-gpu", "--json", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit) as exit:  # Python prints the message to stderr, exit status 1
        bench.main()
    message = exit.value.code
    assert message.startswith("error: --require-gpu: no CUDA GPU is available") and "\n" not in message
    assert capsys.readouterr().out == ""  # nothing measured: no CPU figures
    assert not (tmp_path / "b.json").exists()


def test_require_gpu_refuses_a_gpu_that_does_not_compute(monkeypatch, tmp_path):
    def broken_convolution(*args, **kwargs):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_INITIALIZED\nmore lines")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.functional, "conv2d", broken_convolution)  # where ones() does work
    problem = distributed.gpu_problem()
    assert problem.startswith("CUDA is present but does not work (") and "\n" not in problem
    monkeypatch.setattr(sys, "argv", ["bench.py", "--require-gpu", "--json", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit) as exit:
        bench.main()
    assert exit.value.code == f"error: --require-gpu: {problem}"


class Outcomes:
    """A pytest plugin that records each test's phases and their outcomes."""

    def __init__(self):
        self.reports = []

    def pytest_runtest_logreport(self, report):
        self.reports.append((report.nodeid, report.when, report.outcome, str(report.longrepr)))


def test_the_gpu_tier_fails_instead_of_skipping_under_dsdl_require_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has
    outcomes = {}
    for required in ("1", ""):
        monkeypatch.setenv("DSDL_REQUIRE_GPU", required)
        recorder = Outcomes()
        code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "test_gpu.py")],
                           plugins=[recorder])
        outcomes[required] = code, recorder.reports
    capsys.readouterr()
    code, reports = outcomes["1"]
    assert code == pytest.ExitCode.TESTS_FAILED
    assert [(when, outcome) for _, when, outcome, _ in reports][:1] == [("setup", "failed")]
    assert "DSDL_REQUIRE_GPU=1, but no CUDA GPU is available" in reports[0][3]
    assert not any(outcome == "skipped" for _, _, outcome, _ in reports)
    code, reports = outcomes[""]  # without it: skipped, as in CI
    assert code == pytest.ExitCode.OK and reports
    assert all(outcome == "skipped" for _, when, outcome, _ in reports if when == "setup")


def test_every_gpu_test_has_an_estimate_and_the_gpu_command_fits_in_5_minutes():
    import test_gpu
    tests = {name for name in vars(test_gpu) if name.startswith("test_")}
    assert tests == set(test_gpu.ESTIMATES)
    assert sum(test_gpu.ESTIMATES.values()) + test_gpu.BENCH_ESTIMATE <= 300


def test_on_a_gpu_each_configuration_is_measured_against_its_own_peak(capsys):
    figures = bench.Figures(None, forward_gflop_per_image=100.0, pipeline_img_s_release=100.0,
                            pipeline_img_s_fast=400.0, gpu_decode_img_s=2000.0)
    for name, train in (("release", 100.0), ("release_tf32", 300.0), ("fast", 900.0)):
        figures.add(**{f"{key}_{name}": train * factor for key, factor in
                       (("train_img_s", 1), ("eval_img_s", 3), ("infer_img_s", 3), ("infer_folded_img_s", 3))},
                    **{f"peak_memory_gib_{name}": 10.0})
    names = ["release", "release_tf32", "fast"]
    peaks = {"fp32": 60.0, "tf32": 400.0, "bf16": 800.0}
    bench.derive(figures, names, peaks)
    assert figures.get("mfu_release") == pytest.approx(3 * 100e9 * 100 / 60e12)  # FP32 peak
    assert figures.get("mfu_release_tf32") == pytest.approx(3 * 100e9 * 300 / 400e12)  # TF32 peak
    assert figures.get("mfu_fast") == pytest.approx(3 * 100e9 * 900 / 800e12)  # BF16 peak
    assert figures.get("workers_to_feed_training_fast") == 3  # 900 / 400 images/s, rounded up
    hours = figures.get("hours_to_reproduce_fast")["VOC 2007"]
    assert hours == pytest.approx(200 * (5011 / 900 + 4952 / 2700) / 3600)
    args = options.bench_parser("").parse_args([])
    bench.report(figures, args, names, gpu=True, image_size=448)
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| figure"))
    assert [cell.strip() for cell in header.split("|")[2:-1]] == [
        "release-style fp32", "release-style TF32", "fast", "fast / release-style fp32",
        "fast / release-style TF32"]
    training = next(line for line in table.splitlines() if line.startswith("| training images/s"))
    assert [cell.strip() for cell in training.split("|")[2:-1]] == ["100.0", "300.0", "900.0", "9.00x", "3.00x"]
    utilisation = next(line for line in table.splitlines() if "FLOP utilisation" in line)
    assert [cell.strip() for cell in utilisation.split("|")[2:5]] == ["50.0", "22.5", "33.8"]


def test_the_release_style_path_runs_with_tf32_as_asked_and_the_flags_are_restored(monkeypatch):
    flags = []

    def recording_step(*args, **kwargs):
        flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    monkeypatch.setattr(engine, "train_one_epoch", recording_step)
    monkeypatch.setattr(engine, "evaluate", recording_step)
    settings = argparse.Namespace(model="dsdl", arch="resnet18", pool="max", lambd=10.0, beta=1e-4)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for allow_tf32 in (False, True):
        flags.clear()
        figures = dict(bench.measure_model(torch.device("cpu"), settings, 32, 2, 20, steps=1, warmup=1,
                                           fast=False, rounds=1, allow_tf32=allow_tf32))
        assert set(figures) == {"train_img_s", "eval_img_s", "infer_img_s", "infer_folded_img_s"}
        assert flags == [(allow_tf32, allow_tf32)] * 4  # warm-up and timed pass, training and evaluation
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert bench.CONFIGURATIONS["release"][2:] == (False, "fp32")
    assert bench.CONFIGURATIONS["release_tf32"][2:] == (True, "tf32")
    assert bench.CONFIGURATIONS["fast"][2:] == (False, "bf16")


def test_the_metrics_row_generates_partial_labels_and_times_each_metric_with_its_peak_memory(
        tmp_path, capsys):
    import resource
    import numpy as np
    from util import UNKNOWN
    scores, labels = bench.generated_evaluation(200, 40, verified=8)
    assert (scores.dtype, labels.dtype) == (np.float32, np.int8)
    known = (labels != UNKNOWN).sum(1)  # 8 drawn per image; a class drawn twice is known once
    assert known.max() == 8 and known.min() >= 4 and set(np.unique(labels[labels != UNKNOWN])) == {1, -1}
    assert (bench.generated_evaluation(20, 10, verified=10)[1] != UNKNOWN).all()  # as many as C: all known
    args = argparse.Namespace(device="cpu", json=str(tmp_path / "metrics.json"), metrics=(300, 50),
                              metrics_known=8)
    bench.metrics_row(args)
    out = capsys.readouterr().out
    assert "metrics of 300x50 (8 known labels per image; inputs 0.00 GiB" in out
    for title in ("compute_metrics (every evaluation)", "tune_thresholds (with a validation split)",
                  "top_k_metrics (-e --zero-shot)"):
        assert f"  {title}: " in out
    figures = json.loads((tmp_path / "metrics.json").read_text())
    assert figures["metrics_inputs_gib"] == 300 * 50 * (4 + 1) / 2 ** 30
    # resident: at least what was before (the inputs among it), at most the process's lifetime
    # peak as the kernel's getrusage says (which it updates a little late: 1%)
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    for name in ("metrics", "thresholds", "top_k"):
        assert figures[f"{name}_seconds"] > 0
        assert figures["metrics_resident_before_gib"] - 0.01 <= figures[f"{name}_peak_gib"] <= 1.01 * lifetime_peak
