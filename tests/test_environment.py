"""The one device resolver and the one versions record."""

import pytest
import torch

from clinfuse.environment import RESULT_PACKAGES, resolve_device, versions
from clinfuse.errors import InputError


def test_auto_takes_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") == resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_names_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError) as err:
        resolve_device("cuda")
    assert err.value.key == "train.device"
    with pytest.raises(InputError) as err:
        resolve_device("cuda", key="--device")
    assert err.value.key == "--device"


def test_versions_name_every_result_package():
    found = versions()
    assert list(found) == list(RESULT_PACKAGES)
    assert torch.__version__.startswith(found["torch"])
    assert found["clinfuse"] and found["opacus"] and found["dp-accounting"]
