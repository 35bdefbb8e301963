"""Dynamic-resolution patch embedding for the CLIP vision tower.

Images of different sizes (sides multiples of the patch size) -> normalise (optional) -> patchify -> GEMM with
the patch weight (+ bias) -> + position embeddings bicubically interpolated from the trained grid to each
image's grid (CLIP's `interpolate_pos_encoding`), each image prefixed by its CLS token, all packed into one
(total_tokens, hidden) buffer with cu_seqlens.

Triton path: all images are flattened into one pixel buffer, described by a per-image table. One kernel launch
covers every patch of every image: a program takes a tile of patch rows (which may span images) and a tile of
hidden units, gathers the patch pixels straight from the images (patchify and normalisation live in the load
addressing, no patch matrix is materialised), multiplies with the (C, 3*P*P) weight on tensor cores and adds the
bias and the image's interpolated position embedding in the epilogue. The weight gradient is a second Triton GEMM
that gathers the same patches again; the small reductions (bias, CLS, position rows) are done by torch, and the
position gradient flows back through the bicubic interpolation by autograd.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import config_forced, interpreting, pick_config, use_triton
from ._spec import KernelSpec, Roofline


def patch_embed(images, weight, bias, class_embedding, position_embedding, *, mean=None, std=None):
    """images: a (N, 3, H, W) tensor or a list of (3, H_i, W_i) tensors, H_i and W_i multiples of the patch size;
    weight: (C, 3, P, P) conv weight; bias: (C,) or None; class_embedding: (C,);
    position_embedding: (1 + G*G, C) trained for a G x G grid; mean, std: (3,) or None (images already normalised).
    Returns (embeddings (T, C) in weight's dtype, cu_seqlens (N + 1,) int32, grid_sizes (N, 2) int64 rows (gh, gw));
    each image contributes 1 + gh*gw tokens (CLS first). Gradients flow to weight, bias, class_embedding and
    position_embedding (not to the images)."""
    images = list(images)
    if not images:
        raise ValueError("patch_embed: got no images")
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"patch_embed: weight has shape {tuple(weight.shape)}; expected (C, 3, P, P)")
    hidden, channels, patch = weight.shape[0], weight.shape[1], weight.shape[-1]
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != channels or img.shape[1] % patch or img.shape[2] % patch \
                or img.shape[1] == 0 or img.shape[2] == 0:
            raise ValueError(f"patch_embed: image {i} has shape {tuple(img.shape)}; expected ({channels}, H, W) "
                             f"with H and W non-zero multiples of the patch size {patch}")
    if bias is not None and tuple(bias.shape) != (hidden,):
        raise ValueError(f"patch_embed: bias has shape {tuple(bias.shape)}; expected ({hidden},)")
    if tuple(class_embedding.shape) != (hidden,):
        raise ValueError(f"patch_embed: class_embedding has shape {tuple(class_embedding.shape)}; "
                         f"expected ({hidden},)")
    num_positions = position_embedding.shape[0] - 1 if position_embedding.dim() == 2 else -1
    if num_positions < 1 or math.isqrt(num_positions) ** 2 != num_positions \
            or position_embedding.shape[1] != hidden:
        raise ValueError(f"patch_embed: position_embedding has shape {tuple(position_embedding.shape)}; "
                         f"expected (1 + G*G, {hidden}) for a trained G x G grid")
    if (mean is None) != (std is None):
        raise ValueError("patch_embed: give both mean and std, or neither")
    if mean is not None and (tuple(mean.shape) != (channels,) or tuple(std.shape) != (channels,)):
        raise ValueError(f"patch_embed: mean {tuple(mean.shape)} and std {tuple(std.shape)} must have shape "
                         f"({channels},)")
    if use_triton(weight, *images, gemm=True):
        return _patch_embed_triton(images, weight, bias, class_embedding, position_embedding, mean, std)
    return patch_embed_reference(images, weight, bias, class_embedding, position_embedding, mean=mean, std=std)


def interpolate_position_embedding(position_embedding, grid_h, grid_w):
    """(1 + G*G, C) -> (grid_h * grid_w, C) patch position embeddings, bicubic as CLIP's interpolate_pos_encoding."""
    patch_pos = position_embedding[1:]
    side = math.isqrt(patch_pos.shape[0])
    if (grid_h, grid_w) == (side, side):
        return patch_pos
    grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)


def patchify(image, patch):
    """(3, H, W) -> (gh*gw, 3*P*P), patches row-major, each flattened (channel, row, col) like a conv weight."""
    c, h, w = image.shape
    gh, gw = h // patch, w // patch
    return image.reshape(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4).reshape(gh * gw, c * patch * patch)


def patch_embed_reference(images, weight, bias, class_embedding, position_embedding, *, mean=None, std=None):
    patch = weight.shape[-1]
    w2d = weight.reshape(weight.shape[0], -1)
    pieces, lengths, grids = [], [0], []
    for img in images:
        x = img.to(weight.dtype)
        if mean is not None:
            x = (x - mean.to(x)[:, None, None]) / std.to(x)[:, None, None]
        gh, gw = x.shape[1] // patch, x.shape[2] // patch
        emb = F.linear(patchify(x, patch), w2d, bias)
        emb = emb + interpolate_position_embedding(position_embedding, gh, gw)
        cls = (class_embedding + position_embedding[0])[None]
        pieces.append(torch.cat([cls.to(emb.dtype), emb]))
        lengths.append(lengths[-1] + 1 + gh * gw)
        grids.append((gh, gw))
    device = weight.device
    return (torch.cat(pieces), torch.tensor(lengths, dtype=torch.int32, device=device),
            torch.tensor(grids, dtype=torch.int64, device=device).reshape(-1, 2))


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

# The per-image table: int64 (N, 5), columns (pixel offset of the image in the flat pixel buffer, height, width,
# first patch row of the image among all patch rows, first row of its grid's table in the packed position table).
_TABLE_COLUMNS = ("pixel_offset", "height", "width", "first_row", "pos_offset")


@triton.jit
def _patch_rows(rows, num_rows, patch_image_ptr, image_table_ptr, PATCH: tl.constexpr):
    """For global patch rows (patches of all images, CLS rows excluded) find each row's image and where the patch
    starts in the pixel buffer. Returns (row_ok, image, local patch index, pixel offset of the patch's top-left in
    channel 0, channel plane stride, image width, row of the image's first entry in the position table)."""
    row_ok = rows < num_rows
    image = tl.load(patch_image_ptr + rows, mask=row_ok, other=0)
    entry = image_table_ptr + image * 5  # a row of the image table, columns as _TABLE_COLUMNS
    pixel_offset = tl.load(entry + 0, mask=row_ok, other=0)
    height = tl.load(entry + 1, mask=row_ok, other=1).to(tl.int32)
    width = tl.load(entry + 2, mask=row_ok, other=PATCH).to(tl.int32)
    local = rows - tl.load(entry + 3, mask=row_ok, other=0).to(tl.int32)
    pos_offset = tl.load(entry + 4, mask=row_ok, other=0).to(tl.int32)
    grid_w = width // PATCH
    patch_y = local // grid_w
    patch_x = local - patch_y * grid_w
    patch_start = pixel_offset + (patch_y * PATCH * width + patch_x * PATCH).to(tl.int64)
    return row_ok, image, local, patch_start, height * width, width, pos_offset


@triton.jit
def _load_patch_tile(pixels_ptr, scale_ptr, shift_ptr, row_ok, patch_start, plane, width, ks,
                     PATCH: tl.constexpr, K: tl.constexpr, NORMALIZE: tl.constexpr, dtype: tl.constexpr):
    """Gather a (rows, BLOCK_K) tile of flattened patches; k runs over (channel, row in patch, col in patch) like
    the conv weight. Normalisation x * (1/std) + (-mean/std) is applied per channel in fp32."""
    channel = ks // (PATCH * PATCH)
    within = ks - channel * (PATCH * PATCH)
    dy = within // PATCH
    dx = within - dy * PATCH
    k_ok = ks < K
    offsets = (patch_start[:, None] + (channel[None, :] * plane[:, None]).to(tl.int64)
               + (dy[None, :] * width[:, None] + dx[None, :]))
    mask = row_ok[:, None] & k_ok[None, :]
    x = tl.load(pixels_ptr + offsets, mask=mask, other=0).to(tl.float32)
    if NORMALIZE:
        scale = tl.load(scale_ptr + channel, mask=k_ok, other=0.0)
        shift = tl.load(shift_ptr + channel, mask=k_ok, other=0.0)
        # rows past the end pick up `shift` here, harmlessly: their outputs are never stored and their
        # gradient rows are loaded as zeros
        x = x * scale[None, :] + shift[None, :]
    return x.to(dtype)


@triton.jit
def _patch_embed_fwd_kernel(
    pixels_ptr, patch_image_ptr, image_table_ptr, weight_ptr, bias_ptr, pos_ptr, scale_ptr, shift_ptr, out_ptr,
    num_rows, hidden,
    PATCH: tl.constexpr, CHANNELS: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
    ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[row + image + 1, n] = patches[row] @ weight[n] + bias[n] + pos[pos_offset + local, n]
    (the +image+1 skips the CLS rows of this and all earlier images)."""
    K: tl.constexpr = CHANNELS * PATCH * PATCH
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    row_ok, image, local, patch_start, plane, width, pos_offset = _patch_rows(
        rows, num_rows, patch_image_ptr, image_table_ptr, PATCH)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        # weight is (hidden, K) row-major; read it as a (BLOCK_K, BLOCK_N) tile of its transpose
        w = tl.load(weight_ptr + cols[None, :] * K + ks[:, None], mask=(ks < K)[:, None] & col_ok[None, :],
                    other=0.0)
        x = _load_patch_tile(pixels_ptr, scale_ptr, shift_ptr, row_ok, patch_start, plane, width, ks,
                             PATCH, K, NORMALIZE, w.dtype)
        if ALLOW_TF32:
            acc = tl.dot(x, w, acc)
        else:
            acc = tl.dot(x, w, acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    pos_rows = pos_offset + local
    acc += tl.load(pos_ptr + pos_rows[:, None].to(tl.int64) * hidden + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)
    out_rows = (rows + image + 1).to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * hidden + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_dweight_kernel(
    pixels_ptr, patch_image_ptr, image_table_ptr, grad_out_ptr, scale_ptr, shift_ptr, grad_weight_ptr,
    num_rows, hidden,
    PATCH: tl.constexpr, CHANNELS: tl.constexpr, NORMALIZE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """grad_weight[n, k] = sum over patch rows of grad_out[row + image + 1, n] * patches[row, k]; the patches are
    gathered from the images again rather than kept from the forward."""
    K: tl.constexpr = CHANNELS * PATCH * PATCH
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, num_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok, image, local, patch_start, plane, width, pos_offset = _patch_rows(
            rows, num_rows, patch_image_ptr, image_table_ptr, PATCH)
        out_rows = (rows + image + 1).to(tl.int64)
        g = tl.load(grad_out_ptr + out_rows[:, None] * hidden + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = _load_patch_tile(pixels_ptr, scale_ptr, shift_ptr, row_ok, patch_start, plane, width, ks,
                             PATCH, K, NORMALIZE, g.dtype)
        if ALLOW_TF32:
            acc = tl.dot(tl.trans(g), x, acc)
        else:
            acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee")
    tl.store(grad_weight_ptr + cols[:, None] * K + ks[None, :], acc.to(grad_weight_ptr.dtype.element_ty),
             mask=col_ok[:, None] & (ks < K)[None, :])


# Candidate tilings. The first is the fixed default used under the interpreter; the GPU autotunes over all. The
# patch gather costs registers per element (rows of 14 pixels at arbitrary offsets), so wide tiles want 8 warps;
# every candidate compiles without spills on sm_80 and sm_90 (`gmaivl-rt kernels report`). BLOCK_K=32 keeps the
# padding of K = 3*14*14 = 588 (-> 608) small.
_FWD_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
]
_DWEIGHT_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_K=64, BLOCK_R=32, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, BLOCK_K=64, BLOCK_R=32, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_K=128, BLOCK_R=32, num_warps=8, num_stages=3),
]


def _triton_configs(configs):
    return [triton.Config({k: v for k, v in c.items() if k.isupper()}, num_warps=c["num_warps"],
                          num_stages=c["num_stages"]) for c in configs]


@functools.lru_cache(maxsize=None)
def _autotuned(which):
    if which == "fwd":
        return triton.autotune(_triton_configs(_FWD_CONFIGS), key=["hidden", "PATCH", "CHANNELS"])(
            _patch_embed_fwd_kernel)
    return triton.autotune(_triton_configs(_DWEIGHT_CONFIGS), key=["hidden", "PATCH", "CHANNELS"])(
        _patch_embed_dweight_kernel)


def _launch(which, kernel, configs, grid, *args, **constexprs):
    """Autotune where a GPU driver runs the kernel; a fixed config under the interpreter (autotune cannot run)."""
    if args[0].is_cuda and not interpreting() and not config_forced(configs):
        _autotuned(which)[grid](*args, **constexprs)
    else:
        config = pick_config(configs)
        kernel[grid(config)](*args, **constexprs, **config)


class _PatchEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels, patch_image, image_table, out_to_pos, cls_rows, weight2d, bias, cls_row, pos_table,
                scale, shift, patch):
        num_rows, hidden = patch_image.shape[0], weight2d.shape[0]
        channels = weight2d.shape[1] // (patch * patch)
        total = num_rows + cls_rows.shape[0]
        out = torch.empty(total, hidden, device=weight2d.device, dtype=weight2d.dtype)
        out[cls_rows] = cls_row.to(out.dtype)
        normalize = scale is not None
        _launch("fwd", _patch_embed_fwd_kernel, _FWD_CONFIGS,
                lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), triton.cdiv(hidden, meta["BLOCK_N"])),
                pixels, patch_image, image_table, weight2d, bias if bias is not None else weight2d,
                pos_table, scale if normalize else pixels, shift if normalize else pixels, out,
                num_rows, hidden, PATCH=patch, CHANNELS=channels, HAS_BIAS=bias is not None, NORMALIZE=normalize,
                ALLOW_TF32=_allow_tf32())
        ctx.save_for_backward(pixels, patch_image, image_table, out_to_pos, cls_rows, scale, shift)
        ctx.patch, ctx.channels, ctx.has_bias = patch, channels, bias is not None
        ctx.weight_shape, ctx.pos_rows = weight2d.shape, pos_table.shape[0]
        ctx.dtypes = (weight2d.dtype, bias.dtype if bias is not None else None, cls_row.dtype, pos_table.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        pixels, patch_image, image_table, out_to_pos, cls_rows, scale, shift = ctx.saved_tensors
        w_dtype, b_dtype, cls_dtype, pos_dtype = ctx.dtypes
        grad_out = grad_out.contiguous()
        num_rows, hidden = patch_image.shape[0], grad_out.shape[1]
        grad_weight = grad_bias = grad_cls = grad_pos = None
        if ctx.needs_input_grad[5]:
            grad_weight = torch.empty(ctx.weight_shape, device=grad_out.device, dtype=w_dtype)
            k_total = ctx.weight_shape[1]
            normalize = scale is not None
            _launch("dweight", _patch_embed_dweight_kernel, _DWEIGHT_CONFIGS,
                    lambda meta: (triton.cdiv(hidden, meta["BLOCK_N"]), triton.cdiv(k_total, meta["BLOCK_K"])),
                    pixels, patch_image, image_table, grad_out.to(w_dtype), scale if normalize else pixels,
                    shift if normalize else pixels, grad_weight, num_rows, hidden,
                    PATCH=ctx.patch, CHANNELS=ctx.channels, NORMALIZE=normalize, ALLOW_TF32=_allow_tf32())
        grad_cls_rows = grad_out[cls_rows].float()
        if ctx.needs_input_grad[6] and ctx.has_bias:
            grad_bias = (grad_out.sum(0, dtype=torch.float32) - grad_cls_rows.sum(0)).to(b_dtype)
        if ctx.needs_input_grad[7]:
            grad_cls = grad_cls_rows.sum(0).to(cls_dtype)
        if ctx.needs_input_grad[8]:
            # CLS rows point at an extra last row that is dropped: no gather of the patch rows needed
            grad_pos = torch.zeros(ctx.pos_rows + 1, hidden, device=grad_out.device, dtype=torch.float32)
            grad_pos.index_add_(0, out_to_pos, grad_out.float())
            grad_pos = grad_pos[:-1].to(pos_dtype)
        return (None, None, None, None, None, grad_weight, grad_bias, grad_cls, grad_pos, None, None, None)


def _allow_tf32():
    # fp32 inputs: follow torch's matmul setting so the Triton path is as exact as the reference it replaces
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _patch_embed_triton(images, weight, bias, class_embedding, position_embedding, mean, std):
    device, patch, hidden = weight.device, weight.shape[-1], weight.shape[0]
    grids = [(img.shape[1] // patch, img.shape[2] // patch) for img in images]

    # One interpolated position table per distinct grid (tiny, autograd carries dPos back through the bicubic)
    distinct = list(dict.fromkeys(grids))
    pos_tables = [interpolate_position_embedding(position_embedding, gh, gw) for gh, gw in distinct]
    pos_start = [0]
    for gh, gw in distinct:
        pos_start.append(pos_start[-1] + gh * gw)
    pos_table = torch.cat(pos_tables).contiguous()
    cls_row = class_embedding + position_embedding[0]

    dtypes = {img.dtype for img in images}
    pixel_dtype = dtypes.pop() if len(dtypes) == 1 else weight.dtype
    pixels = torch.cat([img.detach().to(device=device, dtype=pixel_dtype).reshape(-1) for img in images])
    # Per image: a row of the image table (_TABLE_COLUMNS), and for each of its output rows the row of pos_table
    # it adds (CLS rows point at one extra row past the end, which collects nothing useful and is dropped).
    table, out_to_pos, rows, pixel_offset = [], [], 0, 0
    for img, (gh, gw) in zip(images, grids):
        pos_offset = pos_start[distinct.index((gh, gw))]
        table.append((pixel_offset, img.shape[1], img.shape[2], rows, pos_offset))
        out_to_pos.append(torch.arange(pos_offset - 1, pos_offset + gh * gw))
        out_to_pos[-1][0] = pos_table.shape[0]
        rows += gh * gw
        pixel_offset += img.numel()
    image_table = torch.tensor(table, dtype=torch.int64, device=device)
    out_to_pos = torch.cat(out_to_pos).to(device)
    lengths = torch.tensor([gh * gw for gh, gw in grids], device=device)
    patch_image = torch.repeat_interleave(torch.arange(len(images), device=device, dtype=torch.int32), lengths)
    cu_seqlens = torch.zeros(len(images) + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(lengths + 1, 0)

    scale = shift = None
    if mean is not None:
        scale = (1.0 / std.detach().float()).to(device).contiguous()
        shift = (-mean.detach().float().to(device) * scale).contiguous()
    out = _PatchEmbedFunction.apply(pixels, patch_image, image_table, out_to_pos, cu_seqlens[:-1].long(),
                                    weight.reshape(hidden, -1).contiguous(),
                                    bias.contiguous() if bias is not None else None, cls_row, pos_table,
                                    scale, shift, patch)
    grid_sizes = torch.tensor(grids, dtype=torch.int64, device=device).reshape(-1, 2)
    return out, cu_seqlens, grid_sizes


# ----------------------------------------------------------------------------------------------------------------
# GPU readiness report
# ----------------------------------------------------------------------------------------------------------------

def report_specs(dtype="bf16"):
    """Every (kernel, config) the patch embedding can launch with, at the named shape below."""
    images, side, patch, hidden, channels = 8, 336, 14, 1024, 3
    grid = side // patch
    rows, k_total = images * grid * grid, channels * patch * patch
    elem = 2
    gemm_flops = 2.0 * rows * hidden * k_total
    pixel_bytes = images * channels * side * side * elem
    shape = f"{images} images {side}x{side} P={patch} C={hidden} {dtype}"
    fwd = Roofline(shape=shape + " fwd", flops=gemm_flops,
                   bytes=pixel_bytes + hidden * k_total * elem + grid * grid * hidden * elem
                   + (rows + images) * hidden * elem)
    dweight = Roofline(shape=shape + " dweight", flops=gemm_flops,
                       bytes=pixel_bytes + (rows + images) * hidden * elem + hidden * k_total * elem)
    common = {"pixels_ptr": f"*{dtype}", "patch_image_ptr": "*i32", "image_table_ptr": "*i64",
              "scale_ptr": "*fp32", "shift_ptr": "*fp32", "num_rows": "i32", "hidden": "i32",
              "PATCH": "constexpr", "CHANNELS": "constexpr", "NORMALIZE": "constexpr", "ALLOW_TF32": "constexpr"}
    common_constexprs = {"PATCH": patch, "CHANNELS": channels, "NORMALIZE": True, "ALLOW_TF32": False}

    def launch_attrs(fn, signature):
        # what a real launch at this shape specializes on: fresh torch buffers are 16-byte aligned, and
        # num_rows = 4608 and hidden = 1024 are multiples of 16 (Triton's tt.divisibility)
        return {(fn.arg_names.index(name),): (("tt.divisibility", 16),)
                for name, ty in signature.items() if ty != "constexpr"}

    specs = []
    for i, cfg in enumerate(_FWD_CONFIGS):
        blocks = {k: v for k, v in cfg.items() if k.isupper()}
        signature = {**common, "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "pos_ptr": f"*{dtype}",
                     "out_ptr": f"*{dtype}", "HAS_BIAS": "constexpr", **{k: "constexpr" for k in blocks}}
        specs.append(KernelSpec(
            kernel="patch_embed_fwd", fn=_patch_embed_fwd_kernel, signature=signature,
            constexprs={**common_constexprs, "HAS_BIAS": True, **blocks}, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], default=i == 0, uses_dot=True, roofline=fwd,
            extra={"attrs": launch_attrs(_patch_embed_fwd_kernel, signature)}))
    for i, cfg in enumerate(_DWEIGHT_CONFIGS):
        blocks = {k: v for k, v in cfg.items() if k.isupper()}
        signature = {**common, "grad_out_ptr": f"*{dtype}", "grad_weight_ptr": f"*{dtype}",
                     **{k: "constexpr" for k in blocks}}
        specs.append(KernelSpec(
            kernel="patch_embed_dweight", fn=_patch_embed_dweight_kernel, signature=signature,
            constexprs={**common_constexprs, **blocks}, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], default=i == 0, uses_dot=True, roofline=dweight,
            extra={"attrs": launch_attrs(_patch_embed_dweight_kernel, signature)}))
    return specs
