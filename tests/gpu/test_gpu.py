"""Every path on this machine's accelerator: a ZeRO-3 int8 step for every method in bf16 and fp16, AdaLoRA
masks through a checkpoint and resume, generate and export, accelerator memory in MLflow, the loader quantizing
on the device, and the int8 matmul against its reference on the device. One rank (a lent machine has one GPU;
the multi-rank logic is covered by the CPU tests in tests/distributed and by tests/unit/test_devices.py).

Runs where CUDA is available. ``PEFT_DIST_GPU_TESTS=cpu`` runs the same tests on the CPU (gloo; fp32 and
bf16, since DeepSpeed refuses fp16 on a CPU without it), which is how ``bench/gpu_check.sh --cpu`` proves
them without a GPU.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from peft_dist.adapters.registry import methods
from peft_dist.quant.int8 import Int8Linear
from tests.multiproc import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
ON_CPU = os.environ.get("PEFT_DIST_GPU_TESTS") == "cpu"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if ON_CPU else None
PRECISIONS = ("bf16", "fp16") if DEVICE == "cuda" else ("fp32", "bf16")

if DEVICE is None:
    pytest.skip("no CUDA device (set PEFT_DIST_GPU_TESTS=cpu to run these on the CPU)", allow_module_level=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    env = {"DS_ACCELERATOR": "cuda" if DEVICE == "cuda" else "cpu"}  # run_distributed (and conftest) default to cpu
    run_distributed(["-m", "tests.gpu.worker", "--out", str(out), "--precisions", *PRECISIONS], 1, env=env,
                    timeout=1200)
    return json.loads((out / "gpu.json").read_text())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_method_trains_on_the_device(runs, precision):
    assert runs["device"].startswith(DEVICE)
    got = runs[precision]["methods"]
    assert sorted(got) == sorted(methods())
    for method, run in got.items():
        assert all(math.isfinite(loss) for loss in run["losses"]) and math.isfinite(run["eval_loss"]), method
        assert run["losses"][-1] < run["losses"][0], (method, run["losses"])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_adalora_resumes_through_a_checkpoint_exactly(runs, precision):
    uninterrupted = runs[precision]["methods"]["adalora"]["losses"]
    assert runs[precision]["adalora_resumed"] == pytest.approx(uninterrupted, rel=1e-5)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tracked_generated_and_exported(runs, precision):
    tracked = runs[precision]["tracked"]
    if DEVICE == "cuda":
        assert "memory/peak_accelerator_gib/rank0" in tracked["metrics"]
    assert "memory/peak_rss_gib/rank0" in tracked["metrics"] and "train/loss" in tracked["metrics"]
    assert tracked["generated"].startswith("the cat")
    assert tracked["export_gap"] < (1e-4 if precision == "fp32" else 3e-2)  # 16-bit rounding of the logits


def test_the_loader_quantizes_on_the_device_as_the_cpu_does(runs):
    """int8 codes and scales are computed in float32 everywhere: equal. bitsandbytes' CUDA NF4 kernel and its CPU
    code may round a weight at a code boundary the other way: nearly all equal."""
    for bits, loaded in runs["loaded"].items():
        assert loaded["quantized_on"] == runs["device"]
        least = 1.0 if bits == "8" else 0.999
        assert all(share >= least for share in loaded["same"].values()), (bits, loaded["same"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_matmul_on_the_device_matches_float64(dtype):
    if DEVICE == "cpu" and dtype == torch.float16:
        pytest.skip("covered on the CPU by tests/unit/test_int8.py")
    torch.manual_seed(0)
    layer = Int8Linear.from_weight(torch.randn(256, 512), None, dtype=dtype).to(DEVICE)
    x = torch.randn(4, 33, 512, device=DEVICE, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    w = layer.dequantized_weight().double()
    ref = x.detach().double() @ w.t()
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    grad_ref = torch.ones_like(ref) @ w
    assert (x.grad.double() - grad_ref).abs().max() <= tol * grad_ref.abs().max()
