"""Device resolution: one rule for every command's ``--device``."""
from __future__ import annotations

import pytest
import torch

from kernel import search
from kernel.devices import resolve_device
from kernel.errors import KernelError


@pytest.mark.parametrize("value", [None, "", "auto"])
def test_default_is_cuda_when_available_else_cpu(monkeypatch, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(value) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(value) == torch.device("cuda")


def test_a_named_device_is_that_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("value", ["cuda", "cuda:0", torch.device("cuda", 0)])
def test_cuda_without_cuda_is_one_clear_error(monkeypatch, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KernelError, match="CUDA is not available on this machine"):
        resolve_device(value)


def test_an_unknown_device_name_is_one_clear_error():
    with pytest.raises(KernelError, match="--device 'gpu0'"):
        resolve_device("gpu0")


def test_search_resolves_devices_the_same_way():
    assert search.resolve_device is resolve_device


def test_cuda_with_every_gpu_hidden_is_one_clear_error(monkeypatch):
    # CUDA initialised, then CUDA_VISIBLE_DEVICES hid every GPU: an empty device list would crash the extraction
    from kernel.multidevice import extract_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("KERNEL_EXTRACT_DEVICES", raising=False)
    with pytest.raises(KernelError, match="CUDA sees no GPU .*--device cpu"):
        extract_devices(None)
