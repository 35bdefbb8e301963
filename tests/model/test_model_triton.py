"""The tiny model with every op on its Triton kernel (interpreted on CPU) against the same model on the PyTorch
references: packed forward, loss and all parameter gradients, and greedy generation (fp32); decoding under bf16
autocast with fp32 weights, where the KV cache holds the activation dtype and both paths pick the same tokens.
Tolerances: logits/loss 1e-4 absolute; gradients 1e-4 absolute + 1e-3 relative."""
import pytest
import torch

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.kernels._dispatch import kernels


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GMAIVL(GMAIVLConfig.preset("tiny")).train()


@pytest.fixture(scope="module")
def eval_model():
    torch.manual_seed(0)
    return GMAIVL(GMAIVLConfig.preset("tiny")).eval()


def _packed_batch(cfg):
    """Two samples of unequal length packed into one row, one image each."""
    img, n_img = cfg.image_token_index, cfg.num_image_tokens
    a = [3, 4] + [img] * n_img + list(range(10, 23))
    b = [img] * n_img + list(range(30, 36))
    ids = torch.tensor([a + b])
    labels = ids.masked_fill(ids == img, -100)
    cu = torch.tensor([0, len(a), len(a) + len(b)], dtype=torch.int32)
    return ids, labels, cu, torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)


def _run(model, mode, batch):
    ids, labels, cu, pixels = batch
    model.zero_grad(set_to_none=True)
    with kernels(mode):
        out = model(ids, pixel_values=pixels, labels=labels, cu_seqlens=cu, return_logits=True)
        out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_forward_and_backward_match(model):
    batch = _packed_batch(model.config)
    ref, ref_grads = _run(model, "torch", batch)
    tri, tri_grads = _run(model, "triton", batch)
    torch.testing.assert_close(tri.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(tri.loss, ref.loss, atol=1e-4, rtol=0)
    assert ref_grads.keys() == tri_grads.keys()
    # every trained parameter gets a gradient, the vision tower's unused last layer and post-norm excepted
    unused = {n for n, _ in model.named_parameters() if "post_layernorm" in n or ".layers.1." in n and "vision" in n}
    assert set(ref_grads) == {n for n, _ in model.named_parameters()} - unused
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_greedy_generation_matches(model):
    model.eval()
    cfg = model.config
    ids = torch.tensor([[0, 0, 0, 5] + [cfg.image_token_index] * cfg.num_image_tokens + [7, 8],
                        [9] * 3 + [cfg.image_token_index] * cfg.num_image_tokens + [1, 2, 3]])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    outs = {}
    for mode in ("torch", "triton"):
        with kernels(mode):
            outs[mode] = model.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8,
                                        eos_token_id=[], pad_token_id=0)
    assert torch.equal(outs["triton"], outs["torch"])


def test_cache_takes_the_activation_dtype_under_autocast(eval_model):
    assert eval_model.new_cache(1, 4).keys[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert eval_model.new_cache(1, 4).keys[0].dtype == torch.bfloat16


def test_decode_under_autocast_with_fp32_weights(eval_model):
    """fp32 weights, bf16 autocast: q comes out of the projections in bf16; the Triton decode kernel used to refuse
    the fp32 cache. Both paths now decode, and greedily pick the same tokens."""
    cfg = eval_model.config
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])
    outs = {}
    for mode in ("torch", "triton"):
        with kernels(mode), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[mode] = eval_model.generate(ids, max_new_tokens=3, eos_token_id=cfg.text.vocab_size + 1)
    assert outs["triton"].shape == (2, 11)
    assert torch.equal(outs["triton"], outs["torch"])
