"""The Triton path of frozen layers against the torch reference.

On a machine without CUDA the kernel runs in Triton's interpreter (CPU tensors, fp32 and fp16:
the interpreter cannot multiply bf16). Skipped when Triton is not installed (it is optional:
``pip install triton``)."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # read by Triton when a kernel is defined: set it before that
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import given, settings
from hypothesis import strategies as st

import gblr
from fixtures import block_specs, frozen_layer
from gblr.kernels import segmented
from gblr.kernels.choice import measured_paths

pytestmark = pytest.mark.skipif(not segmented.available(), reason="needs Triton (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _frozen(m, n, spec):
    return frozen_layer(m, n, spec, dtype=torch.float32).to(DEVICE)


def _relative_error(y, reference):
    return float((y.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))


@settings(max_examples=25, deadline=None)
@given(st.tuples(block_specs(70, 6), st.sampled_from([16, 32]), st.sampled_from([16, 32]), st.integers(1, 40)))
def test_segmented_gemms_agree_with_reference_on_random_structures(case):
    # wrap-around, overlapping, one-element and full blocks, rank 1-3, dense blocks; several groups;
    # widths that are not multiples of block_k (the input is padded, segments moved left)
    (m, n, spec), block, block_k, tokens = case
    layer = _frozen(m, n, spec)
    product = segmented.pack_triton(n, m, list(layer.blocks()), block, 48 - block, block_k, device=DEVICE)
    x = torch.randn(tokens, n, device=DEVICE)
    with torch.no_grad():
        reference = layer.run("reference", x)
        y = segmented.triton_forward(x, product)
    assert y.shape == (tokens, m)
    if spec:
        assert _relative_error(y, reference) < 1e-5
    else:
        assert torch.all(y == 0)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 3e-3)]
                         + ([(torch.bfloat16, 2e-2)] if DEVICE == "cuda" else []))
def test_triton_kernel_setting_runs_the_kernel(dtype, tolerance):
    torch.manual_seed(0)
    layer = gblr.GBLRLinear(96, 160, rank=2, init_flops_ratio=0.3).freeze().to(DEVICE, dtype)
    x = torch.randn(2, 17, 96, device=DEVICE).to(dtype)
    with torch.no_grad():
        layer.kernel = "reference"
        reference = layer(x)
        layer.kernel = "triton"
        y = layer(x)
    assert y.dtype == dtype and y.shape == reference.shape
    assert _relative_error(y, reference) < tolerance
    product = layer.packed("triton", x)
    assert product.second.block == segmented.OUT_BLOCK
    # padded MACs: at least the layer's FLOPs, and every stage-2 group is one output tile
    assert product.macs >= layer.flops() and product.second.group_count == -(-160 // segmented.OUT_BLOCK)


def test_auto_times_the_kernel_on_cuda_only():
    x = torch.zeros(1, 4)
    assert "triton" not in measured_paths(x)
    if DEVICE == "cuda":
        assert "triton" in measured_paths(x.cuda())


def test_cpu_tensors_outside_the_interpreter_get_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = _frozen(8, 8, [(0, 4, 0, 4, 1)]).cpu()
    product = segmented.pack_triton(8, 8, list(layer.blocks()), 16, 16, 16)
    with pytest.raises(ValueError, match="CUDA"):
        segmented.triton_forward(torch.randn(2, 8), product)

