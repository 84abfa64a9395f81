"""Margins formula, sub-centre max, ArcFace target logit, numerical safety in low precision."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernel.train.losses import ArcFaceLoss, SoftmaxHead, SoftmaxLoss, SubcenterArcMargin, build_loss, dynamic_margins


def test_dynamic_margins_formula():
    # x = n^(-1/4) = 1, 0.5, 0.1 -> margins 0.05 + 0.45 * (x - 0.1) / 0.9
    m = dynamic_margins([1, 16, 10_000])
    np.testing.assert_allclose(m, [0.5, 0.05 + 0.45 * 0.4 / 0.9, 0.05], rtol=1e-12)
    counts = np.array([3, 7, 7, 120, 5000])
    x = counts ** -0.25
    np.testing.assert_allclose(dynamic_margins(counts, a=0.3, b=0.1), 0.1 + 0.3 * (x - x.min()) / (x.max() - x.min()))
    # rarer class -> larger margin
    assert np.all(np.diff(dynamic_margins(counts)) <= 0)


def test_dynamic_margins_edge_cases():
    np.testing.assert_allclose(dynamic_margins([5, 5, 5]), [0.05, 0.05, 0.05])
    with pytest.raises(ValueError):
        dynamic_margins([3, 0])
    with pytest.raises(ValueError):
        dynamic_margins([])


def test_subcenter_head_takes_max_over_subcentres():
    head = SubcenterArcMargin(4, n_classes=2, k=3)
    e = torch.eye(4)
    with torch.no_grad():
        # rows are class-major: rows 0..2 = class 0, rows 3..5 = class 1
        head.weight.copy_(torch.stack([e[0], -e[0], e[1], e[2], e[2], 2 * e[2]]))
    feats = torch.stack([e[1] * 5, e[0], -e[0] + e[2]])
    cos = head(feats)
    assert cos.shape == (3, 2)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0], [1.0, 0.0], [s, s]])
    torch.testing.assert_close(cos, expected, atol=1e-6, rtol=0)


def test_arcface_target_logit_and_loss():
    loss_fn = ArcFaceLoss(0.3, s=30.0)
    theta = torch.tensor([0.5, 3.0])  # the second lies past pi - m: the monotonic fallback applies
    cos = torch.cos(theta)
    got = loss_fn.target_logit(cos, torch.tensor([0, 0]))
    assert got[0].item() == pytest.approx(math.cos(0.8), abs=1e-6)
    assert got[1].item() == pytest.approx(math.cos(3.0) - math.sin(math.pi - 0.3) * 0.3, abs=1e-6)
    logits = torch.tensor([[0.2, 0.9, -0.1], [0.5, 0.1, 0.3]])
    target = torch.tensor([1, 0])
    manual = logits.clone()
    for i, t in enumerate(target):
        manual[i, t] = math.cos(math.acos(logits[i, t].item()) + 0.3)
    expected = F.cross_entropy(manual * 30.0, target)
    assert loss_fn(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_per_class_margins_follow_the_target():
    loss_fn = ArcFaceLoss([0.1, 0.5], s=1.0)
    cos = torch.tensor([0.6, 0.6])
    got = loss_fn.target_logit(cos, torch.tensor([0, 1]))
    assert got[0].item() == pytest.approx(math.cos(math.acos(0.6) + 0.1), abs=1e-6)
    assert got[1].item() == pytest.approx(math.cos(math.acos(0.6) + 0.5), abs=1e-6)
    with pytest.raises(ValueError):
        loss_fn(torch.zeros(2, 3), torch.tensor([0, 1]))  # 3 classes but 2 margins


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_numerically_safe_in_low_precision(dtype):
    head = SubcenterArcMargin(8, n_classes=5, k=3)
    feats = torch.randn(6, 8).to(dtype).requires_grad_()
    with torch.no_grad():
        head.weight[0:3] = feats[0].float()  # cosine exactly 1 for sample 0, class 0
        head.weight[3:6] = -feats[1].float()  # cosine exactly -1 for sample 1, class 1
    loss_fn = build_loss({"type": "arcface", "s": 45, "margins": "dynamic", "a": 0.45, "b": 0.05},
                         [1, 2, 300, 4, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = head(feats)
        assert cos.dtype == torch.float32
        loss = loss_fn(cos, torch.tensor([0, 1, 2, 3, 4, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(feats.grad.float()).all() and torch.isfinite(head.weight.grad).all()


def test_softmax_head_and_loss():
    head = SoftmaxHead(4, 3)
    x = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 1, 0])
    logits = head(x)
    assert SoftmaxLoss()(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item())
    assert isinstance(build_loss({"type": "softmax"}, [1, 1, 1]), SoftmaxLoss)
    with pytest.raises(ValueError):
        build_loss({"type": "triplet"}, [1])


def test_loss_follows_the_device_of_its_inputs():
    loss_fn = ArcFaceLoss([0.1, 0.2, 0.3])
    assert loss_fn.margins.device.type == "cpu"
    assert "margins" not in loss_fn.state_dict()  # derived from the data, not a checkpoint entry
