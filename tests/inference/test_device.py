"""The inference device: a GPU that torch sees but cannot run a kernel on is never used."""

import pytest
import torch

from cellseg.data.submission import read_submission, validate_submission
from cellseg.errors import CellsegError
from cellseg.inference import device as inference_device
from cellseg.inference.runner import predict_folder
from inference_helpers import make_competition, make_manifest

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("small"), n_models=1, tta=("identity",), detections_per_view=30)


def test_unusable_gpu_falls_back_to_cpu_loudly(small_manifest, tmp_path, monkeypatch):
    """CUDA 'available' but its first kernel fails (a torch without this card's architecture): auto ->
    the CPU with a loud log line, and the submission is still written; an explicit --device cuda is a
    one-line error."""

    def no_kernel_image(device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(inference_device, "_tiny_kernel", no_kernel_image)
    logs = []
    assert inference_device.resolve_device("auto", log=logs.append) == CPU
    assert len(logs) == 1 and "no kernel image" in logs[0] and "FALLING BACK TO THE CPU" in logs[0]
    with pytest.raises(CellsegError, match="cannot run a kernel"):
        inference_device.resolve_device("cuda")
    comp = make_competition(tmp_path / "comp", n_test=2)
    logs.clear()
    res = predict_folder(comp, small_manifest, tmp_path / "sub.csv", progress=False, log=logs.append)
    assert res.device == "cpu" and any("FALLING BACK TO THE CPU" in line for line in logs)
    assert validate_submission(tmp_path / "sub.csv", comp / "test") == []
    assert sum(map(len, read_submission(tmp_path / "sub.csv").values())) > 0


def test_working_device_is_kept(monkeypatch):
    """Control for the test above: the probe is what decides (a kernel that runs keeps CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(inference_device, "_tiny_kernel", lambda device: None)
    logs = []
    assert inference_device.resolve_device("auto", log=logs.append) == torch.device("cuda", 0) and logs == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device.resolve_device("auto", log=logs.append) == CPU and logs == []
