"""Checkpoint loader errors name the model, the file and the keys; nothing loads half-way."""
import copy
import json

import pytest
import torch

from kernel.errors import KernelError
from kernel.models import CheckpointError, build_model, load_model, load_weights
from kernel.demo.weights import deterministic_state_dict, original_layout, preset_entries

TINY = {e["name"]: e for e in preset_entries("tiny")}


def _ckpt(name):
    model = build_model(TINY[name])
    return model, deterministic_state_dict(original_layout(model))


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "model_state_dict"])
def test_wrappers_and_prefixes(tmp_path, wrapper):
    model, sd = _ckpt("hybrid_b6_swin384_384")
    sd = {f"module.{k}": v for k, v in sd.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(sd if wrapper is None else {wrapper: sd, "epoch": 3}, path)
    load_weights(model, path)


def test_fp16_checkpoint_loads_into_fp32_model():
    """A half-precision checkpoint (what the bundle's fp16 conversion ships) gives an fp32 model holding its values."""
    model, sd = _ckpt("effnet_b3_768")
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    load_weights(model, half)
    own = model.state_dict()
    assert {v.dtype for v in own.values() if v.is_floating_point()} == {torch.float32}
    for key, value in half.items():
        if key in own:  # the training head is dropped
            assert torch.equal(own[key], value.to(own[key].dtype)), key


def test_truncated_file(tmp_path):
    model, sd = _ckpt("dolg_effnet_b5_768")
    path = tmp_path / "dolg.pth"
    torch.save({"model": sd}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"dolg.pth.*(truncated|corrupt|readable)"):
        load_weights(model, path, "dolg_effnet_b5_768")


def test_empty_and_missing_files(tmp_path):
    model, _ = _ckpt("dolg_effnet_b5_768")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_weights(model, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, tmp_path / "nope.pth")


def test_wrong_architecture_names_model_file_and_keys(tmp_path):
    _, effnet_sd = _ckpt("effnet_b3_768")
    dolg, _ = _ckpt("dolg_effnet_b5_768")
    path = tmp_path / "effnet.pth"
    torch.save(effnet_sd, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(dolg, path, "dolg_effnet_b5_768")
    msg = str(err.value)
    assert "dolg_effnet_b5_768" in msg and "effnet.pth" in msg
    assert "missing keys" in msg and "attention2d." in msg and "unexpected keys" in msg and "enet." in msg


def test_missing_key():
    model, sd = _ckpt("dolg_effnet_b5_768")
    del sd["bn_g.running_var"]
    with pytest.raises(CheckpointError, match=r"1 missing keys: bn_g.running_var"):
        load_weights(model, sd, "dolg_effnet_b5_768")


def test_unexpected_key():
    model, sd = _ckpt("effnet_b6_512")
    sd["feat2.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys: feat2.weight"):
        load_weights(model, sd)


def test_wrong_shape():
    model, sd = _ckpt("effnet_b6_512")
    sd["feat.weight"] = torch.zeros(256, sd["feat.weight"].shape[1])
    with pytest.raises(CheckpointError, match=r"wrong shapes: feat.weight: checkpoint \(256"):
        load_weights(model, sd)


def test_wrong_swin_window_is_an_error_not_a_resample():
    model, sd = _ckpt("hybrid_b3_swin224_896")
    key = next(k for k in sd if k.endswith("relative_position_bias_table"))
    sd[key] = torch.zeros(sd[key].shape[0] + 20, sd[key].shape[1])
    with pytest.raises(CheckpointError, match="relative_position_bias_table"):
        load_weights(model, sd)


def test_no_state_dict_inside(tmp_path):
    model, _ = _ckpt("effnet_b6_512")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_weights(model, {"epoch": 1, "config": {"lr": 1}})


def test_load_model_checks_sha256(tiny_weights, tmp_path):
    folder, manifest = tiny_weights
    entry = next(e for e in json.loads(manifest.read_text())["models"] if e["name"] == "effnet_b6_512")
    model = load_model(entry, folder)
    assert not model.training
    bad = copy.deepcopy(entry)
    bad["sha256"] = "0" * 64
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(bad, folder)


def test_checkpoint_error_is_a_kernel_error(tmp_path, capsys):
    """A checkpoint that does not fit reaches the user as the CLI's one ``error:`` line (exit 2), no traceback."""
    from types import SimpleNamespace

    from kernel.cli import run_command

    model, sd = _ckpt("effnet_b6_512")
    del sd["feat.bias"]
    torch.save(sd, tmp_path / "effnet.pth")
    rc = run_command(lambda args: load_weights(model, tmp_path / "effnet.pth", "effnet_b6_512"), SimpleNamespace())
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: model 'effnet_b6_512': ") and "1 missing keys: feat.bias" in err[0]
    assert issubclass(CheckpointError, KernelError)
