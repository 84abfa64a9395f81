"""The projected training cost follows its stated formula from the recipes' own numbers."""
import pytest

from kernel.budget import DEFAULT_EFFICIENCY, GPU_FP16_TFLOPS
from kernel.errors import KernelError
from kernel.train.cost import step_cost
from kernel.train.recipes import resolve_step


def test_step_cost_formula_and_its_inputs():
    step = resolve_step("effnet_b3_768", 2)  # 544 px, 40 epochs stopped at 29
    c = step_cost(step, gpu="V100", images={"gldv2x": 1000})
    assert (c["images"], c["epochs"], c["image_size"]) == (1000, 29, 544)
    assert 5 < c["gflop"] < 30  # an EfficientNet-B3 at 544 px
    ms = 3 * c["gflop"] / (GPU_FP16_TFLOPS["V100"] * DEFAULT_EFFICIENCY["effnet"])
    assert c["ms_per_image"] == pytest.approx(ms, rel=1e-2)
    assert c["gpu_hours"] == pytest.approx(1000 * 29 * ms / 3.6e6, rel=1e-2)
    faster = step_cost(step, gpu="H100", images={"gldv2x": 1000})
    assert faster["gpu_hours"] < c["gpu_hours"]
    dual = step_cost(dict(step, cutmix=True), gpu="V100", images={"gldv2x": 1000})
    assert dual["gpu_hours"] == pytest.approx(2 * c["gpu_hours"])  # Corner-Cutmix: two streams
    with pytest.raises(KernelError, match="unknown GPU 'TPU'"):
        step_cost(step, gpu="TPU")


def test_step_cost_of_an_architecture_with_nested_lists():
    # the tiny preset's hybrids carry lists inside backbone_args (Swin depths): the GFLOP cache must take them
    from kernel.demo.weights import preset_entries

    entries = preset_entries("tiny")
    size = next(e["image_size"] for e in entries if e["name"] == "hybrid_b6_swin384_384")
    step = resolve_step("hybrid_b6_swin384_384", 3, entries, {"image_size": size})
    assert any(isinstance(v, list) for v in step["arch"].get("backbone_args", {}).values())
    c = step_cost(step, gpu="V100", images={"gldv2x": 10})
    assert c["images"] == 10 and c["ms_per_image"] > 0 and c["gpu_hours"] > 0
