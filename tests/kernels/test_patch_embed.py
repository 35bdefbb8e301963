"""Dynamic-resolution patch embedding: the Triton kernels (interpreted on CPU) against transformers'
CLIPVisionEmbeddings and against the plain PyTorch reference, forward and gradients.

Tolerances: atol = ULPS x eps(dtype) x max|expected| per tensor, against an fp32 ground truth. Measured worst
|error| / (eps x max|expected|) over these tests: fp32 2.5 (forward and gradients: sums of 588-term products in
another order), fp16 0.73 (fp16 inputs and weights, fp32 accumulation, one rounding on store); ULPS is 2-3x that.
The former absolute tolerances (fp32 1e-4 / 1e-3, fp16 3e-2 / 0.15) were 8-100x the measured errors.
Mutants, applied by hand to kernels/patch_embed.py: 1/std rounded to fp16 in the wrapper (`scale = (1.0 /
std.float()).half().float()`) fails test_triton_matches_reference_with_bias_and_normalisation[fp32] (so did the old
check: the error is 1e-3); the fp16 accumulator rounded to fp16 after each of the 19 K blocks (BLOCK_K 32) passes
both: roundings of partial sums smaller than the tensor's largest value stay within 2 ulps of that value.
bf16 is not run through the Triton path here: the interpreter cannot do `tl.dot` on bf16.
"""
import pytest
import torch
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from gmaivl_rt.kernels._dispatch import kernels

from gmaivl_rt.kernels.patch_embed import patch_embed, patch_embed_reference

PATCH = 14
ULPS = {torch.float32: 6.0, torch.float16: 2.0}


def assert_close_on_scale(got, want, dtype, what="output"):
    """got (computed in dtype) within ULPS[dtype] x eps x max|want| of the fp32 `want`, every element."""
    atol = ULPS[dtype] * torch.finfo(dtype).eps * want.abs().max().item()
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=0, msg=lambda m: f"{what} ({dtype}): {m}")


def _clip_embeddings(hidden, grid):
    config = CLIPVisionConfig(hidden_size=hidden, image_size=PATCH * grid, patch_size=PATCH, num_channels=3,
                              intermediate_size=4 * hidden, num_hidden_layers=1, num_attention_heads=1)
    module = CLIPVisionEmbeddings(config)
    with torch.no_grad():  # small weights so outputs are O(1)
        module.patch_embedding.weight.mul_(0.05)
    return module


def _params(module, dtype):
    return [p.detach().to(dtype).clone().requires_grad_() for p in
            (module.patch_embedding.weight, module.class_embedding, module.position_embedding.weight)]


def _grads(output, params, grad_output):
    return torch.autograd.grad(output, params, grad_output.to(output.dtype))


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_clip_embeddings_on_mixed_aspect_ratios(path, dtype):
    hidden, grid = 40, 3  # hidden not a multiple of the 64-wide tile
    module = _clip_embeddings(hidden, grid)
    # wide, single-patch, tall, and the trained size (no interpolation)
    images = [torch.randn(3, 28, 42), torch.randn(3, 14, 14), torch.randn(3, 56, 28), torch.randn(3, 42, 42)]

    expected = torch.cat([module(img[None], interpolate_pos_encoding=True)[0] for img in images])
    grad_output = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(
        expected, (module.patch_embedding.weight, module.class_embedding, module.position_embedding.weight),
        grad_output)

    weight, class_embedding, position_embedding = _params(module, dtype)
    with kernels(path):
        out, cu_seqlens, grid_sizes = patch_embed([img.to(dtype) for img in images], weight, None,
                                                  class_embedding, position_embedding)
    grads = _grads(out, (weight, class_embedding, position_embedding), grad_output)

    assert out.dtype == dtype and out.shape == expected.shape
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 7, 9, 18, 28]
    assert grid_sizes.tolist() == [[2, 3], [1, 1], [4, 2], [3, 3]]
    assert_close_on_scale(out, expected, dtype)
    for name, got, want in zip(("weight", "class", "position"), grads, expected_grads):
        assert_close_on_scale(got, want, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference_with_bias_and_normalisation(triton_path, dtype):
    """uint8 images normalised in the kernel's load, a bias, a 2x2 trained grid, and enough patches (103) that
    tiles of 64 rows span image boundaries."""
    hidden, grid = 72, 2
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
              for h, w in [(98, 84), (14, 70), (42, 42), (28, 14), (70, 56)]]
    mean = torch.tensor([0.48, 0.46, 0.41]) * 255
    std = torch.tensor([0.27, 0.26, 0.28]) * 255
    params32 = [torch.randn(hidden, 3, PATCH, PATCH) * 0.05, torch.randn(hidden), torch.randn(hidden),
                torch.randn(1 + grid * grid, hidden)]
    ref_params = [p.clone().requires_grad_() for p in params32]
    expected, expected_cu, expected_grid = patch_embed_reference(images, *ref_params, mean=mean, std=std)
    grad_output = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, ref_params, grad_output)

    params = [p.to(dtype).requires_grad_() for p in params32]
    out, cu_seqlens, grid_sizes = patch_embed(images, *params, mean=mean, std=std)
    grads = _grads(out, params, grad_output)

    assert cu_seqlens.tolist() == expected_cu.tolist() and grid_sizes.tolist() == expected_grid.tolist()
    assert_close_on_scale(out, expected, dtype)
    for name, got, want in zip(("weight", "bias", "class", "position"), grads, expected_grads):
        assert_close_on_scale(got, want, dtype, f"d{name}")


def test_triton_fixed_size_batch_matches_clip_without_interpolation(triton_path):
    """The fixed-resolution call: a (N, 3, S, S) batch at the trained size, as the model uses at 336."""
    module = _clip_embeddings(hidden=24, grid=2)
    pixels = torch.randn(3, 3, 28, 28)
    expected = module(pixels).reshape(-1, 24)
    weight, class_embedding, position_embedding = _params(module, torch.float32)
    out, cu_seqlens, _ = patch_embed(pixels, weight, None, class_embedding, position_embedding)
    assert cu_seqlens.tolist() == [0, 5, 10, 15]
    assert_close_on_scale(out, expected, torch.float32)


def test_triton_frozen_weight_single_patch_image(triton_path):
    """Only the embeddings train (weight and bias frozen, so no weight-gradient kernel runs); a lone 14x14 image
    is a single patch, interpolated down from a 2x2 grid."""
    hidden = 16
    weight, bias = torch.randn(hidden, 3, PATCH, PATCH) * 0.05, torch.randn(hidden)
    class_embedding, positions = torch.randn(hidden, requires_grad=True), torch.randn(5, hidden, requires_grad=True)
    images = [torch.randn(3, 14, 14)]
    out, cu_seqlens, _ = patch_embed(images, weight, bias, class_embedding, positions)
    grad_output = torch.randn_like(out)
    grads = torch.autograd.grad(out, (class_embedding, positions), grad_output)
    ref_params = [class_embedding.detach().clone().requires_grad_(), positions.detach().clone().requires_grad_()]
    expected = patch_embed_reference(images, weight, bias, *ref_params)[0]
    expected_grads = torch.autograd.grad(expected, ref_params, grad_output)
    assert cu_seqlens.tolist() == [0, 2]
    assert_close_on_scale(out, expected, torch.float32)
    for name, got, want in zip(("class", "position"), grads, expected_grads):
        assert_close_on_scale(got, want, torch.float32, f"d{name}")


@pytest.mark.parametrize("case, message", [
    ("not_multiple", "multiples of the patch size 14"),
    ("wrong_channels", r"expected \(3, H, W\)"),
    ("empty", "no images"),
    ("mean_only", "both mean and std"),
    ("bad_positions", r"1 \+ G\*G"),
    ("bad_bias", "bias has shape"),
])
def test_patch_embed_rejects_bad_input(case, message):
    hidden = 8
    weight, bias = torch.randn(hidden, 3, PATCH, PATCH), torch.randn(hidden)
    class_embedding, positions = torch.randn(hidden), torch.randn(5, hidden)
    images, kwargs = [torch.randn(3, 28, 14)], {}
    if case == "not_multiple":
        images = [torch.randn(3, 28, 14), torch.randn(3, 30, 28)]
    elif case == "wrong_channels":
        images = [torch.randn(1, 28, 28)]
    elif case == "empty":
        images = []
    elif case == "mean_only":
        kwargs = {"mean": torch.zeros(3)}
    elif case == "bad_positions":
        positions = torch.randn(6, hidden)
    elif case == "bad_bias":
        bias = torch.randn(hidden + 1)
    with pytest.raises(ValueError, match=message):
        patch_embed(images, weight, bias, class_embedding, positions, **kwargs)
