"""Training nets write the original layout; checkpoints round-trip through kernel.models.load_weights;
weights move between recipe steps (plain Swin -> hybrid, block insertion)."""
import json
import re

import pytest
import torch

from kernel.errors import KernelError
from kernel.models import build_model, load_manifest, load_weights
from kernel.demo.weights import REPO_MANIFEST, preset_entries
from kernel.train.checkpoint import atomic_save, from_original, load_record, model_record, to_original, transfer
from kernel.train.data import ClassMap
from kernel.train.nets import Retrieval2020Net, SwinNeck, Trainee, attach_head, build_net, get_head
from tests.conftest import FIXTURES

FULL = {e["name"]: e for e in load_manifest(REPO_MANIFEST)}
TINY = {e["name"]: e for e in preset_entries("tiny")}


@pytest.mark.parametrize("name", ["effnet_b3_768", "dolg_effnet_b5_768", "hybrid_b3_swin224_896"])
def test_training_net_keys_are_the_original_layout(name):
    with torch.device("meta"):  # full-size architectures, no memory
        net = attach_head(build_net(FULL[name]), n_classes=7, k=3)
    ours = {k: tuple(v.shape) for k, v in to_original(net.state_dict(), net.family).items()}
    ref = {k: tuple(s) for k, s, _ in json.loads((FIXTURES / "layouts" / f"{name}.json").read_text())["layout"]}
    head = "metric_classify.weight" if net.family == "effnet" else "head.weight"
    assert ours[head] == ref[head] == (21, 512)
    assert all(ref.get(k) == s for k, s in ours.items()), [k for k in ours if ref.get(k) != ours[k]][:3]
    # what the original saved and we do not: Swin's derived buffers, the hybrid's unused GeM and the embedder
    # blocks past its feature level (the zoo drops those when loading)
    left = [k for k in set(ref) - set(ours) if not (
        "relative_position_index" in k or "attn_mask" in k or k == "global_pool.p"
        or re.match(r"backbone\.patch_embed\.backbone\.(blocks\.[4-9]|conv_head|bn2)", k))]
    assert left == []


@pytest.mark.parametrize("name", ["effnet_b6_512", "dolg_effnet_b5_768", "hybrid_b6_swin384_384", "hybrid_b3_swin224_896"])
def test_checkpoint_round_trip_through_load_weights(tmp_path, name):
    entry = TINY[name]
    torch.manual_seed(0)
    net = attach_head(build_net(entry), n_classes=5, k=3)
    with torch.no_grad():  # move every tensor away from its init so a skipped key would show
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for n, b in net.named_buffers():
            if n.endswith("running_var"):
                b.mul_(1.3)
    net.eval()
    x = torch.randn(2, 3, entry["image_size"], entry["image_size"])
    expected = net(x)
    path = atomic_save(model_record(net, ClassMap([4, 8, 15, 16, 23]), recipe=name, step=1, epoch=3,
                                    arch=entry), tmp_path / "model.pth")
    rec = load_record(path)
    assert rec["class_map"] == [4, 8, 15, 16, 23] and rec["epoch"] == 3
    head = "metric_classify.weight" if entry["family"] == "effnet" else "head.weight"
    assert rec["model"][head].shape == (15, 512)
    if entry["family"] == "hybrid":  # old timm layout: patch merging at the end of stage i
        assert any(re.match(r"backbone\.layers\.0\.downsample\.", k) for k in rec["model"])
    fresh = load_weights(build_model(entry), path).eval()
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    # and back into a training net (resume): identical state
    again = attach_head(build_net(entry), 5)
    again.load_state_dict(from_original(rec["model"], entry["family"]), strict=True)
    torch.testing.assert_close(again.eval()(x), expected, rtol=1e-5, atol=1e-6)


def test_trainee_returns_descriptors_and_head_logits():
    net = attach_head(build_net(TINY["effnet_b6_512"]), n_classes=4)
    emb, logits = Trainee(net).eval()(torch.randn(3, 3, 64, 64))
    assert emb.shape == (3, 512) and logits.shape == (3, 4)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert get_head(net) is net.metric_classify
    soft = attach_head(build_net(TINY["dolg_effnet_b5_768"]), n_classes=4, kind="softmax")
    assert set(soft.head.state_dict()) == {"weight", "bias"}


def test_swin_step_to_hybrid_step_transfer():
    entry = TINY["hybrid_b6_swin384_384"]
    swin = attach_head(SwinNeck(entry["backbone"], image_size=64, backbone_args=entry["backbone_args"]), 6)
    sd = from_original(to_original(swin.state_dict(), "swin"), "swin")
    hybrid = attach_head(build_net(entry), 6)
    rep = transfer(hybrid, sd, pop=["patch_embed"], min_fraction=0.3)
    assert all("patch_embed" not in k for k in rep.loaded)
    assert "backbone.layers.1.blocks.0.attn.qkv.weight" in rep.loaded and "neck.0.weight" in rep.loaded
    assert "head.weight" in rep.loaded
    assert any(k.startswith("backbone.patch_embed.backbone.") for k in rep.missing)  # embedder starts at init
    torch.testing.assert_close(hybrid.state_dict()["backbone.norm.weight"], swin.state_dict()["backbone.norm.weight"])


def test_block_insertion_keeps_old_blocks_and_remakes_projection():
    entry = dict(TINY["hybrid_b6_swin384_384"])  # embedder level 1 at 64 px
    old = attach_head(build_net(entry), 3)
    bigger = attach_head(build_net(dict(entry, feature_level=2, image_size=128)), 3)  # one more block
    rep = transfer(bigger, old.state_dict(), pop=["patch_embed.proj.weight"], min_fraction=0.3)
    assert "backbone.patch_embed.proj.weight" in rep.popped
    assert "backbone.patch_embed.backbone.blocks.1.0.conv_pwl.weight" in rep.loaded
    assert any(k.startswith("backbone.patch_embed.backbone.blocks.2.") for k in rep.missing)


def test_transfer_refuses_an_unrelated_checkpoint():
    net = build_net(TINY["effnet_b6_512"])
    with pytest.raises(KernelError, match="wrong checkpoint"):
        transfer(net, {"something.else": torch.zeros(3)}, what="init from x.pth")


def test_retrieval2020_net():
    net = attach_head(Retrieval2020Net("resnet18"), n_classes=10, k=1)
    emb, logits = Trainee(net).eval()(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 512) and logits.shape == (2, 10)
    assert net.head.weight.shape == (10, 512) and net.fc.kernel_size == (1, 1)
    with torch.device("meta"):
        for backbone in ("resnet152", "resnest200e"):
            assert Retrieval2020Net(backbone).fc.in_channels == 2048
