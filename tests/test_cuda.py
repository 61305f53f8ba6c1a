"""The CUDA path (skipped without a GPU, so CI never runs it): lossless decoding there, with either
grouped-query attention path (or the one timed faster), and the same tokens as on the CPU."""

import copy
import random

import pytest
import torch

from specstream.decoding import DecodeSettings, plain_decode, specstream_decode
from specstream.loading import load_base_model
from specstream.streams import SpeculativeModel

from .conftest import random_adapter
from .test_decoding import tokens_of

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_base(tiny_dir):
    # float64, as on the CPU: near-ties must not flip between differently batched passes.
    return load_base_model(str(tiny_dir), device=DEVICE, dtype="float64")


@pytest.mark.parametrize("gqa", ["native", "expand", "auto"])
@pytest.mark.parametrize("seed", range(3))
def test_specstream_equals_plain_on_cuda_and_on_the_cpu(cuda_base, tiny_base, monkeypatch, gqa, seed):
    monkeypatch.setenv("SPECSTREAM_GQA", gqa)
    rng = random.Random(seed)
    adapter = random_adapter(tiny_base, seed)
    prompt = [rng.randrange(3, 24) for _ in range(rng.randrange(1, 10))]
    settings = DecodeSettings(max_new_tokens=30, top_k=(6, 4, 3), node_budget=rng.choice([5, 60]),
                              lookup_tokens=5, stream_pass=rng.choice(["joint", "likely"]), stop_at_eos=False)
    # deep copies: moving a module to a device moves it in place
    gpu = SpeculativeModel(cuda_base.weights, copy.deepcopy(adapter))
    cpu = SpeculativeModel(tiny_base.weights, copy.deepcopy(adapter))
    plain = tokens_of(plain_decode(gpu, prompt, settings))
    assert tokens_of(specstream_decode(gpu, prompt, settings)) == plain
    assert tokens_of(plain_decode(cpu, prompt, settings)) == plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_norm_on_the_gpu_is_the_norm(dtype):
    """On a GPU the RMS norm is torch's fused kernel (fewer launches); it must compute what the op-by-op norm does."""
    from specstream.llama import rms_norm

    x = torch.randn(7, 576, device=DEVICE, dtype=dtype) * 3
    weight = (torch.rand(576, device=DEVICE) + 0.5).to(dtype)
    x32 = x.float()
    expected = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), expected, rtol=tolerance, atol=tolerance)
