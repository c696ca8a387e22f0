"""The inference device: a GPU that torch sees but that fails any probe step is never used.

No test machine has a GPU: each test makes ``torch.cuda.is_available`` say yes, and either the
context step fails (``torch.cuda.current_device`` raising, as with a driver too old for the build), or
the context is opened on the CPU (``_open_context``) so that the real kernel / nms / roi_align steps run
there, and the torch or torchvision function one step calls is made to fail or give a wrong answer.
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from cellseg.data.submission import read_submission, validate_submission
from cellseg.errors import CellsegError
from cellseg.inference import device as inference_device
from cellseg.inference.runner import predict_folder
from inference_helpers import make_competition, make_manifest

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("small"), n_models=1, tta=("identity",), detections_per_view=30)


def no_kernel_image(*args, **kwargs):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """torch says CUDA is available, and the probe's context opens on the CPU, where its steps run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(inference_device, "_open_context", lambda device: CPU)


def test_probe_passes_on_a_working_device(cuda_on_cpu):
    """Control for the failures below: with every step working, auto keeps the probed device with no
    log line, and an explicit cuda is no error."""
    logs = []
    assert inference_device.resolve_device("auto", log=logs.append) == CPU and logs == []
    assert inference_device.resolve_device("cuda:0") == CPU
    assert inference_device.probe_cuda("cuda") == (CPU, None)


@pytest.mark.parametrize(
    ("step", "module", "name", "fake"),
    [
        ("kernel", F, "conv2d", no_kernel_image),
        ("nms", torchvision.ops, "nms", no_kernel_image),
        ("roi_align", torchvision.ops, "roi_align", no_kernel_image),
        # a kernel that runs but computes garbage fails its step too
        ("nms", torchvision.ops, "nms", lambda boxes, scores, thr: torch.arange(len(boxes))),
        ("roi_align", torchvision.ops, "roi_align", lambda x, rois, **kw: torch.zeros(len(rois), x.shape[1], 2, 2)),
    ],
)
def test_each_failing_step_falls_back_to_cpu_loudly(cuda_on_cpu, monkeypatch, step, module, name, fake):
    monkeypatch.setattr(module, name, fake)
    logs = []
    assert inference_device.resolve_device("auto", log=logs.append) == CPU
    assert len(logs) == 1, logs
    assert "FALLING BACK TO THE CPU" in logs[0] and f"({step}: " in logs[0], logs[0]
    with pytest.raises(CellsegError, match=f"probe failed \\({step}: "):
        inference_device.resolve_device("cuda")


def test_context_failure_falls_back_to_cpu_loudly(small_manifest, tmp_path, monkeypatch):
    """CUDA 'available' but no context can be made (torch.cuda.current_device raising, as with a
    driver too old for the build): auto -> the CPU with one loud log line, and the submission is still
    written; an explicit --device cuda is a one-line error."""

    def driver_too_old():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 10010)\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", driver_too_old)
    logs = []
    assert inference_device.resolve_device("auto", log=logs.append) == CPU
    assert len(logs) == 1 and "(context: RuntimeError: The NVIDIA driver" in logs[0], logs
    assert "FALLING BACK TO THE CPU" in logs[0]
    comp = make_competition(tmp_path / "comp", n_test=2)
    logs.clear()
    res = predict_folder(comp, small_manifest, tmp_path / "sub.csv", progress=False, log=logs.append)
    assert res.device == "cpu" and sum("FALLING BACK TO THE CPU" in line for line in logs) == 1
    assert validate_submission(tmp_path / "sub.csv", comp / "test") == []
    assert sum(map(len, read_submission(tmp_path / "sub.csv").values())) > 0


def test_explicit_cuda_on_a_device_without_context_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch.zeros on cuda:0 then fails here
    with pytest.raises(CellsegError, match=r"--device cuda:0: the GPU probe failed \(context: "):
        inference_device.resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CellsegError, match="no CUDA GPU is available"):
        inference_device.resolve_device("cuda")
    assert inference_device.resolve_device("auto") == CPU


def test_speed_options_are_off_unless_asked(monkeypatch):
    """cudnn.benchmark and channels_last stay off by default (an H100 measured neither faster); the
    environment switches turn them on, and channels_last leaves a model's outputs unchanged."""
    for name in (inference_device.CUDNN_BENCHMARK_ENV, inference_device.CHANNELS_LAST_ENV):
        monkeypatch.delenv(name, raising=False)
    assert inference_device.speed_options() == {"cudnn_benchmark": False, "channels_last": False}
    conv = torch.nn.Conv2d(3, 8, 3)
    assert inference_device.apply_speed_options([conv], CPU) == {"cudnn_benchmark": False, "channels_last": False}
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 16, 16)
    before = conv(x)
    monkeypatch.setenv(inference_device.CHANNELS_LAST_ENV, "1")
    monkeypatch.setenv(inference_device.CUDNN_BENCHMARK_ENV, "1")
    assert inference_device.speed_options() == {"cudnn_benchmark": True, "channels_last": True}
    # cudnn.benchmark is a CUDA flag: on the CPU it is not applied (nor reported applied)
    assert inference_device.apply_speed_options([conv], CPU) == {"cudnn_benchmark": False, "channels_last": True}
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv(x), before)
    assert inference_device.speed_options({inference_device.CHANNELS_LAST_ENV: "0"})["channels_last"] is False
