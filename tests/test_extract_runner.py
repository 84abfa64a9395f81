"""The per-model runner's CUDA safety nets, exercised on the CPU with injected failures: out-of-memory
back-off, the NaN/inf guard that recomputes in fp32 (CPU autocast fp16 stands in for CUDA's), the switch to
fp32 for a model that keeps overflowing, and a clear error for a model broken even in fp32."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kernel.errors import KernelError
from kernel.extract import ModelRunner, is_oom


class Linear(nn.Module):
    """A deterministic little descriptor model: flatten -> linear (B, 8)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3 * 4 * 4, 8, generator=g))
        self.calls = []

    def forward(self, x):
        self.calls.append((len(x), torch.is_autocast_enabled("cpu")))
        return x.flatten(1) @ self.w


class OOMAbove(Linear):
    """Raises the CUDA out-of-memory error for batches larger than ``limit``."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def forward(self, x):
        if len(x) > self.limit:
            self.calls.append((len(x), "oom"))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


class OverflowInHalf(Linear):
    """Returns inf for the items in ``bad`` (a row marker) whenever autocast is on, like an fp16 overflow."""

    def forward(self, x):
        out = super().forward(x)
        if torch.is_autocast_enabled("cpu"):
            out = out.clone()
            out[x[:, 0, 0, 0] > 10] = float("inf")
        return out


def _batch(n, bad=()):
    x = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x[list(bad), 0, 0, 0] = 100.0  # marks the items that "overflow" in half precision
    return x


def _reference(x):
    with torch.no_grad():
        return nn.functional.normalize(Linear()(x), dim=1)


def test_out_of_memory_halves_the_batch_and_keeps_it():
    model = OOMAbove(limit=3)
    r = ModelRunner(model, "m", "cpu", batch_size=16)
    x = _batch(10)
    torch.testing.assert_close(r(x), _reference(x))
    assert r.batch_size == 2  # 16 -> 8 -> 4 -> 2
    assert [c for c in model.calls if c[1] == "oom"] == [(10, "oom"), (8, "oom"), (4, "oom")]
    model.calls.clear()
    torch.testing.assert_close(r(x), _reference(x))
    assert all(c[1] != "oom" for c in model.calls)  # the smaller size stuck


def test_out_of_memory_at_batch_size_one_is_a_clear_error():
    r = ModelRunner(OOMAbove(limit=0), "big_model", "cpu", batch_size=4)
    with pytest.raises(KernelError, match="'big_model' does not fit .* batch size 1"):
        r(_batch(2))


def test_other_errors_are_not_mistaken_for_out_of_memory():
    assert is_oom(torch.OutOfMemoryError("x")) and is_oom(RuntimeError("CUDA out of memory."))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))

    class Broken(Linear):
        def forward(self, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        ModelRunner(Broken(), "m", "cpu", 4)(_batch(2))


def test_nan_guard_recomputes_only_the_bad_items_in_fp32():
    model = OverflowInHalf()
    r = ModelRunner(model, "hybrid", "cpu", batch_size=8, precision="fp16")
    x = _batch(8, bad=(1, 6))
    out = r(x)
    assert torch.isfinite(out).all() and r.recomputed == 2
    torch.testing.assert_close(out[[1, 6]], _reference(x)[[1, 6]])  # exact fp32 result for those
    torch.testing.assert_close(out, _reference(x), atol=2e-2, rtol=0)  # the rest is the fp16 result
    assert model.calls == [(8, True), (2, False)]
    assert r.amp_dtype == torch.float16


def test_a_model_that_keeps_overflowing_switches_to_fp32():
    model = OverflowInHalf()
    r = ModelRunner(model, "hybrid", "cpu", batch_size=4, precision="fp16")
    for _ in range(3):
        r(_batch(4, bad=(0, 1, 2)))
    assert r.amp_dtype is None  # 9 of 12 items overflowed: fp16 is not worth it for this model
    model.calls.clear()
    out = r(_batch(4, bad=(0, 1, 2)))
    assert model.calls == [(4, False)] and torch.isfinite(out).all()


def test_non_finite_in_fp32_is_a_broken_checkpoint():
    class NaNModel(Linear):
        def forward(self, x):
            return super().forward(x) * float("nan")

    with pytest.raises(KernelError, match="'bad' gives non-finite descriptors in fp32 .* checkpoint is broken"):
        ModelRunner(NaNModel(), "bad", "cpu", 4)(_batch(3))


def test_outputs_are_l2_normalised_float32_on_the_cpu():
    r = ModelRunner(Linear(), "m", "cpu", batch_size=3)
    out = r(_batch(7))
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (7, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7))
    assert r.items == 7 and r.seconds > 0
    with pytest.raises(KernelError, match="precision"):
        ModelRunner(Linear(), "m", "cpu", 4, precision="int8")
