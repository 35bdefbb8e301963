"""Loading and saving GMAIVL weights as safetensors (never pickle).

Layouts read (each key is mapped to our names, transformers' in-memory Llava names without "model."):
- transformers 5.x Llava on disk: vision_tower.*, multi_modal_projector.*, language_model.model.*,
  language_model.lm_head.*; and 5.x in-memory names (model.vision_tower.*, model.language_model.*, lm_head.*).
- transformers 4.x Llava (GMAI-VL's trainer): vision_tower.vision_model.*, the rest as 5.x on disk.
- InternLM2 text names: tok_embeddings, attention.wqkv (fused, grouped per KV head), attention.wo,
  feed_forward.w1/w3/w2, attention_norm, ffn_norm, norm, output.
Tensors load one at a time straight into the target dtype and device on a model built on the meta device, so
peak memory is the model plus one tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from gmaivl_rt.atomic import atomic_path, atomic_write_json
from gmaivl_rt.model.config import GMAIVLConfig
from gmaivl_rt.errors import ModelError

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# `__metadata__` key of the hex SHA-256 of a safetensors file's data region (every byte after the header), which
# save_pretrained writes and loading verifies; files without it (written by others) load unverified.
DIGEST_KEY = "gmaivl_sha256"
_DIGEST_PLACEHOLDER = "0" * 64
_FINITE_CHUNK = 1 << 24  # elements per isfinite pass in the fallback: bounds its temporaries

# (prefix as stored, our prefix); the first match wins.
_PREFIXES = [
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.output.", "lm_head."),
]
# InternLM2 module names -> Llama names, inside language_model.*
_INTERNLM2_NAMES = [
    ("language_model.tok_embeddings.", "language_model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
]
_WQKV = ".attention.wqkv."


class CheckpointError(ModelError):
    """A checkpoint folder that cannot be loaded; the message names the file and what is wrong."""


def canonical_name(key: str) -> str:
    for stored, ours in _PREFIXES:
        if key.startswith(stored):
            key = ours + key[len(stored):]
            break
    if key.startswith("language_model."):
        for stored, ours in _INTERNLM2_NAMES:
            key = key.replace(stored, ours)
    return key


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's fused projection -> (q, k, v). Its rows view as [num_kv_heads, q_per_kv + 2, head_dim]: in each
    KV group the first q_per_kv slices are query heads, then one key head, then one value head."""
    q_per_kv = num_heads // num_kv_heads
    expected_rows = num_kv_heads * (q_per_kv + 2) * head_dim
    if wqkv.shape[0] != expected_rows:
        raise CheckpointError(f"wqkv has {wqkv.shape[0]} rows; {num_heads} heads / {num_kv_heads} kv heads of "
                              f"dim {head_dim} need {expected_rows}")
    grouped = wqkv.reshape(num_kv_heads, q_per_kv + 2, head_dim, *wqkv.shape[1:])
    q = grouped[:, :q_per_kv].reshape(num_heads * head_dim, *wqkv.shape[1:])
    k = grouped[:, -2].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    v = grouped[:, -1].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    return q, k, v


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: a sharded index if present, else model.safetensors."""
    if (path / INDEX_FILE).is_file():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a valid safetensors index ({e})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX_FILE} names shards that are not there: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return [path / p for p in others]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f" ({', '.join(pickles)} are pickle files, which are never loaded: convert them to safetensors)" \
        if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file{hint}")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters[leaf]
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def _read(handle, key: str, file: Path) -> torch.Tensor:
    try:
        tensor = handle.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for torn data
        raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e}); the file may be truncated") from None
    check_finite_tensor(tensor, key, file)
    return tensor


def check_finite_tensor(tensor: torch.Tensor, name: str, file) -> None:
    """CheckpointError naming the tensor when a floating-point tensor holds NaN or inf. One min/max pass (NaN
    propagates into both, +-inf shows in one): no temporary tensor, several times faster than reading the bytes."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    try:
        low, high = torch.aminmax(tensor.reshape(-1))
        finite = bool(torch.isfinite(low)) and bool(torch.isfinite(high))
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax (float8): isfinite in bounded chunks
        flat = tensor.reshape(-1)
        finite = all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK].float()).all())
                     for i in range(0, flat.numel(), _FINITE_CHUNK))
    if not finite:
        raise CheckpointError(f"{file}: tensor {name!r} has non-finite values (NaN or inf); the weights are "
                              "corrupt")


def data_region_sha256(file: Path, header_len: int, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a safetensors file's tensor bytes (everything after its 8 + header_len header bytes)."""
    import hashlib

    digest = hashlib.sha256()
    with open(file, "rb") as f:
        f.seek(8 + header_len)
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_safetensors(file, check_finite: bool = True) -> dict:
    """Check one safetensors file the way loading does, for callers that do not load it (the trainer's resume):
    complete (header and size agree), its SHA-256 when the header carries one, and every floating-point tensor
    finite. Returns the header; raises CheckpointError naming the file (and the tensor)."""
    file = Path(file)
    header = _check_complete(file)
    if check_finite:
        with _open_safetensors(file) as handle:
            for key in handle.keys():
                _read(handle, key, file)
    return header


def _open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it may be truncated") from None


def load_pretrained(cls, path, dtype=None, device=None):
    """Build `cls(config)` on the meta device and fill it tensor by tensor from the folder's safetensors."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model folder")
    config = GMAIVLConfig.from_pretrained(path)
    files = weight_files(path)
    with torch.device("meta"):
        model = cls(config)
    expected = dict(model.named_parameters())
    t = config.text
    loaded, unexpected, mismatched = set(), [], []
    wrong_shape = set()  # present but mis-shaped: listed once, as a mismatch, not again as missing
    for file in files:
        _check_complete(file)
        with _open_safetensors(file) as handle:
            for key in handle.keys():
                name = canonical_name(key)
                if _WQKV in name:
                    prefix, _, leaf = name.partition(_WQKV)
                    parts = split_wqkv(_read(handle, key, file), t.num_heads, t.num_kv_heads, t.head_dim)
                    items = [(f"{prefix}.self_attn.{p}_proj.{leaf}", x) for p, x in zip("qkv", parts)]
                else:
                    if name == "lm_head.weight" and t.tie_word_embeddings:
                        continue  # tied to the embeddings
                    if name not in expected:
                        unexpected.append(key)
                        continue
                    shape = tuple(handle.get_slice(key).get_shape())
                    if shape != tuple(expected[name].shape):
                        mismatched.append(f"{key}: checkpoint {shape} vs model {tuple(expected[name].shape)}")
                        wrong_shape.add(name)
                        continue
                    items = [(name, None)]
                for target, tensor in items:
                    if target not in expected:
                        unexpected.append(key)
                        continue
                    tensor = _read(handle, key, file) if tensor is None else tensor
                    if tuple(tensor.shape) != tuple(expected[target].shape):
                        mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model "
                                          f"{tuple(expected[target].shape)}")
                        wrong_shape.add(target)
                        continue
                    _assign(model, target, tensor.to(device=device, dtype=dtype or tensor.dtype))
                    loaded.add(target)
    missing = sorted(set(expected) - loaded - wrong_shape)
    if missing or unexpected or mismatched:
        raise CheckpointError(_describe_problems(path, missing, unexpected, mismatched))
    if t.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    return model.eval()


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_float_dtype(path) -> torch.dtype | None:
    """The widest floating dtype among a model folder's safetensors tensors (None when none is floating), read from
    the headers alone."""
    found = set()
    for file in weight_files(Path(path)):
        header = _read_header(file)[1]
        found |= {v.get("dtype") for k, v in header.items() if k != "__metadata__"}
    widths = [dtype for name, dtype in _SAFETENSORS_FLOATS.items() if name in found]
    return widths[0] if widths else None


# The short dtype names the CLI, the ONNX export and deploy.json use.
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def inference_dtype(device, dtype=None, stored=None, capability=None) -> torch.dtype | None:
    """The dtype `gmaivl_rt.load` (torch backend) puts a checkpoint's weights in; None keeps the stored dtypes.

    dtype: the caller's choice, which always wins. device: the target (None = CPU, "cuda", "cuda:1", a
    torch.device). stored: the checkpoint's widest float dtype (`stored_float_dtype`). capability: the GPU's
    (major, minor), queried from the device when None. On CUDA with no dtype given, an fp32 (or fp64) checkpoint,
    e.g. a DDP one, loads in bf16, or fp16 on a GPU without bf16 (before sm_80): fp32 there takes the PyTorch
    reference instead of our kernels (kernels._dispatch), doubles memory and misses tensor cores. CPU keeps fp32."""
    if dtype is not None:
        return dtype
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda" or stored not in (torch.float32, torch.float64):
        return None
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def _read_header(file: Path) -> tuple[int, dict, int]:
    """(header length, parsed safetensors header, file size); CheckpointError when the header is torn or not JSON."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: {size} bytes is too short to be a safetensors file (truncated?)")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise CheckpointError(f"{file}: header says {header_len} bytes but the file has {size} (truncated)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: the safetensors header is not valid JSON (corrupt or truncated)") \
                from None
    return header_len, header, size


def _check_complete(file: Path) -> dict:
    """Refuse a torn file before memory-mapping it: the header's last data offset must match the file size; then,
    when the header carries a SHA-256 of the data (DIGEST_KEY), bytes changed in place. Returns the header."""
    header_len, header, size = _read_header(file)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(f"{file}: tensors need {8 + header_len + end} bytes but the file has {size} "
                              "(truncated or corrupt)")
    expected = (header.get("__metadata__") or {}).get(DIGEST_KEY)
    if expected is not None and data_region_sha256(file, header_len) != expected:
        raise CheckpointError(f"{file}: tensor data does not match the SHA-256 saved with it (changed or corrupted "
                              "after it was written)")
    return header


def _write_digest(file: Path) -> None:
    """Fill the placeholder digest in a just-written file's header with the SHA-256 of its data region (same
    length, so the header and every offset stay as they are)."""
    with open(file, "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = f.read(header_len)
        digest = data_region_sha256(file, header_len)
        marker = f'"{DIGEST_KEY}":"{_DIGEST_PLACEHOLDER}"'.encode()
        at = header.find(marker)
        if at < 0:
            raise CheckpointError(f"{file}: digest placeholder not found in the header just written")
        f.seek(8 + at + len(marker) - len(_DIGEST_PLACEHOLDER) - 1)
        f.write(digest.encode())


def _describe_problems(path, missing, unexpected, mismatched, limit=20) -> str:
    def listing(title, items):
        shown = "\n    ".join(items[:limit])
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    text = f"{path}: checkpoint does not match the model its config.json describes"
    if mismatched:
        text += listing("shape mismatches (does config.json disagree with the weights?)", mismatched)
    if missing:
        text += listing("missing keys", missing)
    if unexpected:
        text += listing("unexpected keys", unexpected)
    return text


def disk_name(name: str) -> str:
    """Our name -> the name transformers 5.x `save_pretrained` writes for a Llava."""
    if name.startswith("language_model."):
        return "language_model.model." + name[len("language_model."):]
    if name.startswith("lm_head."):
        return "language_model." + name
    return name


def save_pretrained(model, path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`), each file atomically;
    weight files of an earlier save that the new one does not use are removed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {disk_name(n): p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    meta = {"format": "pt", DIGEST_KEY: _DIGEST_PLACEHOLDER}
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        with atomic_path(path / name) as tmp:
            save_file(shard, str(tmp), metadata=meta)
            _write_digest(Path(tmp))
    if len(shards) > 1:
        weight_map = {k: n for n, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_json(path / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        if stale.name not in names and stale.exists() and not (len(shards) > 1 and stale.name == INDEX_FILE):
            os.unlink(stale)
    hf = model.config.to_hf_config()
    hf["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    atomic_write_json(path / "config.json", hf)
