"""The Kaggle accelerator: kernel-metadata.json per --accelerator, and the notebook's machine cell deciding which
GPUs the job may use (a P100 under a torch without sm_60, two T4s, no GPU at all)."""
from __future__ import annotations

import os

import pytest

from kernel.bundle import notebook
from kernel.errors import KernelError

TORCH_2_14_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
TORCH_2_7_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
P100 = {"index": 0, "name": "Tesla P100-PCIE-16GB", "capability": "6.0", "memory_gb": 15.9, "works": False,
        "error": "RuntimeError: CUDA error: no kernel image is available for execution on the device"}


def _t4(i):
    return {"index": i, "name": "Tesla T4", "capability": "7.5", "memory_gb": 14.7, "works": True}


def test_machine_shape_per_accelerator(caplog):
    meta = {a: notebook.kernel_metadata("u", "k", "t", "k.ipynb", "u/d", "recognition", False, accelerator=a)
            for a in notebook.ACCELERATORS}
    assert meta["t4x2"]["enable_gpu"] and meta["t4x2"]["machine_shape"] == "NvidiaTeslaT4"
    assert meta["p100"]["enable_gpu"] and meta["p100"]["machine_shape"] == "NvidiaTeslaP100"
    assert not meta["cpu"]["enable_gpu"] and "machine_shape" not in meta["cpu"]
    assert notebook.check_accelerator("t4x2") == [] and notebook.check_accelerator("cpu") == []
    (warning,) = notebook.check_accelerator("p100")
    assert "retired" in warning and "NvidiaTeslaT4" in warning and "retired" in caplog.text
    with pytest.raises(KernelError, match="--accelerator 'v100'"):
        notebook.kernel_metadata("u", "k", "t", "k.ipynb", "u/d", "recognition", False, accelerator="v100")


def _machine_cell(info, accelerator, monkeypatch, device=None):
    """Run the machine cell with ``info`` as what the probe found; returns (namespace, printed lines)."""
    # the cell sets CUDA_VISIBLE_DEVICES: setenv first so that monkeypatch restores the variable (or its
    # absence) afterwards; a bare delenv of an absent variable records nothing, and the cell's value would
    # leak into later tests (on a GPU machine it hid the GPU from every extraction test after this one)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    printed = []
    ns = {"os": os, "sys": __import__("sys"), "ACCELERATOR": accelerator, "DEVICE": device,
          "print": lambda *a, **k: printed.append(" ".join(map(str, a)))}
    source = notebook.MACHINE.replace("MACHINE_INFO = probe_machine()", "MACHINE_INFO = FAKE_INFO")
    assert source != notebook.MACHINE
    ns["FAKE_INFO"] = info
    exec(compile(source, "<machine cell>", "exec"), ns)
    return ns, "\n".join(printed).splitlines()


def test_a_p100_under_a_torch_without_sm60_is_loud_and_the_job_goes_to_the_cpu(monkeypatch):
    info = {"torch": "2.14.1+cu130", "cuda_build": "13.0", "archs": TORCH_2_14_ARCHS, "gpus": [P100]}
    ns, lines = _machine_cell(info, "p100", monkeypatch)
    assert lines[0].startswith("torch 2.14.1+cu130 (CUDA build 13.0); compiled for: sm_75")
    assert "GPU 0: Tesla P100-PCIE-16GB, compute capability 6.0, 15.9 GB" in lines
    assert any(line.startswith("!!! NO USABLE GPU") for line in lines)
    assert any("sm_60" in line and "not among the architectures" in line for line in lines)
    assert any("torch 2.7.1 or older" in line for line in lines)
    assert ns["DEVICE"] == "cpu" and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    # the same card under torch 2.7.1 (sm_50..sm_90): usable
    info = {**info, "torch": "2.7.1+cu126", "archs": TORCH_2_7_ARCHS, "gpus": [{**P100, "works": True}]}
    ns, lines = _machine_cell(info, "p100", monkeypatch)
    assert not any("NO USABLE GPU" in line for line in lines) and ns["DEVICE"] is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_two_t4s_are_both_used_and_a_missing_one_is_noted(monkeypatch):
    info = {"torch": "2.14.1+cu130", "cuda_build": "13.0", "archs": TORCH_2_14_ARCHS, "gpus": [_t4(0), _t4(1)]}
    ns, lines = _machine_cell(info, "t4x2", monkeypatch)
    assert [g["index"] for g in ns["USABLE_GPUS"]] == [0, 1] and ns["DEVICE"] is None
    assert "GPU 1: Tesla T4, compute capability 7.5, 14.7 GB" in lines
    assert not any(line.startswith(("!!!", "note:", "warning:")) for line in lines)
    ns, lines = _machine_cell({**info, "gpus": [_t4(0)]}, "t4x2", monkeypatch)
    assert any(line.startswith("note: built for t4x2 (2 GPU(s)") for line in lines)
    # one GPU failing its test operation is left out, the other is used
    ns, lines = _machine_cell({**info, "gpus": [_t4(0), {**_t4(1), "works": False, "error": "ECC"}]}, "t4x2",
                              monkeypatch)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and ns["DEVICE"] is None
    assert any(line.startswith("warning: GPU 1 Tesla T4 fails a test operation: ECC") for line in lines)


def test_no_gpu_at_all_is_loud(monkeypatch):
    ns, lines = _machine_cell({"torch": "2.14.1", "cuda_build": None, "archs": [], "gpus": []}, "t4x2", monkeypatch)
    assert any(line.startswith("!!! NO USABLE GPU") for line in lines)
    assert any("torch sees no CUDA device" in line for line in lines) and ns["DEVICE"] is None


def test_compiled_for():
    ns = {}
    exec(notebook.MACHINE[:notebook.MACHINE.index("def usable_gpus")], ns)
    compiled_for = ns["compiled_for"]
    assert compiled_for("7.5", TORCH_2_14_ARCHS) and not compiled_for("6.0", TORCH_2_14_ARCHS)
    assert compiled_for("6.0", TORCH_2_7_ARCHS) and compiled_for("6.1", ["sm_60"])  # same major, newer minor
    assert not compiled_for("8.0", ["sm_86"]) and compiled_for("12.1", ["compute_120"])


def test_the_machine_cell_leaves_the_environment_as_it_found_it(monkeypatch):
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with pytest.MonkeyPatch.context() as mp:
        info = {"torch": "2.14.1+cu130", "cuda_build": "13.0", "archs": TORCH_2_14_ARCHS, "gpus": [P100]}
        _machine_cell(info, "p100", mp)
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""  # the cell hid the unusable P100
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
