"""The training augmentations on the torchvision a Kaggle image may ship (down to 0.19, the floor in
pyproject.toml): what 0.19 / 0.20 lack is simulated on the installed version. The real old versions
run in tools/oldtorch_venv.sh (train stage)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

import cellseg.data.transforms as transforms
from cellseg.data.geometric import RandomScaleCrop
from cellseg.errors import CellsegError


def test_random_gamma_answers_the_hook_names_torchvision_before_0_21_calls():
    img = tv_tensors.Image(torch.linspace(0, 1, 64).reshape(1, 8, 8))
    gamma = transforms.RandomGamma((2.0, 2.0))
    params = gamma._get_params([img])  # 0.19 / 0.20: Transform.forward calls these two
    assert params == {"gamma": 2.0}
    out = gamma._transform(img, params)
    assert torch.allclose(out, img**2)  # gamma 2 squares intensities in [0, 1]


def test_query_size_comes_from_v2_utils_where_v2_does_not_export_it(monkeypatch):
    from torchvision.transforms.v2._utils import query_size

    monkeypatch.delattr(v2, "query_size")  # torchvision 0.19
    importlib.reload(transforms)
    assert v2.query_size is query_size
    img = tv_tensors.Image(torch.zeros(1, 20, 30))
    out = RandomScaleCrop(crop_size=(10, 12))(img)  # reads v2.query_size
    assert tuple(out.shape[-2:]) == (10, 12)


def test_gaussian_noise_without_v2_gaussian_noise_is_one_line(monkeypatch):
    monkeypatch.delattr(v2, "GaussianNoise")  # torchvision 0.19
    cfg = transforms.AugmentConfig(noise_sigma=0.05, noise_p=0.5)
    with pytest.raises(CellsegError, match=r"augment.noise_sigma needs torchvision >= 0.20"):
        transforms.build_transform(cfg)
