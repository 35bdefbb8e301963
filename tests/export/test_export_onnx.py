"""ONNX export + ONNX Runtime backend against the torch model and transformers, on a checkpoint transformers made.

Tolerances: fp32 graphs 1e-4 absolute against the torch model (ONNX Runtime CPU provider); fp16 graphs
1e-2 absolute + 1e-2 relative against the fp32 torch model (fp16 weights and activations, outputs of order 1).
Shapes checked differ from the ones traced at export (batch 2, sequence 3, past 4, 42x70 pixels).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hf_reference import IMAGE_TOKEN
from onnx_graphs import graph_next_token_logits
from transformers import LlavaForConditionalGeneration

import gmaivl_rt
from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.export import onnx_export
from gmaivl_rt.export.onnx_export import DEPLOY_JSON, GRAPH_FILES, past_names

ATOL_FP32 = 1e-4
TOL_FP16 = dict(atol=1e-2, rtol=1e-2)
N_IMG = 4  # (28 / 14)^2 image tokens per image


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return GMAIVL.from_pretrained(hf_checkpoint).eval()


@pytest.fixture(scope="module")
def onnx_dir(exported):
    return exported("fp32")


def _session(folder, graph):
    return ort.InferenceSession(str(folder / GRAPH_FILES[graph]), providers=["CPUExecutionProvider"])


def _prompts(batch, seed=1, lengths=(3, 1, 6)):
    """`batch` left-padded prompts, each text + one image + text, with their images."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        before = torch.randint(0, 100, (lengths[i % len(lengths)],), generator=g).tolist()
        after = torch.randint(0, 100, (2 + i,), generator=g).tolist()
        rows.append(before + [IMAGE_TOKEN] * N_IMG + after)
    width = max(map(len, rows))
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for r, seq in enumerate(rows):
        ids[r, width - len(seq):] = torch.tensor(seq)
        mask[r, width - len(seq):] = 1
    return ids, mask, torch.randn(batch, 3, 28, 28, generator=g)


def _decoder_feeds(embeds, mask, positions, past, logits_indices=None):
    """Decoder inputs; logits_indices defaults to every position of every row (all S logits)."""
    batch, seq = embeds.shape[:2]
    if logits_indices is None:
        logits_indices = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
             "logits_indices": logits_indices}
    return {**feeds, **dict(zip(past_names(len(past) // 2), past))}


# ------------------------------------------------------------------------------------------ files and metadata
def test_export_writes_checked_graphs_and_deploy_json(onnx_dir, model):
    for graph, file in GRAPH_FILES.items():
        proto = onnx.load(str(onnx_dir / file))
        onnx.checker.check_model(proto, full_check=True)
        assert {o.domain for o in proto.opset_import} >= {""}
        assert next(o.version for o in proto.opset_import if o.domain == "") == 23
    deploy = json.loads((onnx_dir / DEPLOY_JSON).read_text())
    assert GMAIVLConfig.from_hf_config(deploy["config"]) == model.config
    assert deploy["image"]["image_token_index"] == IMAGE_TOKEN and deploy["image"]["tokens_per_image"] == N_IMG
    decoder = deploy["graphs"]["decoder_model_merged"]
    assert [i["name"] for i in decoder["inputs"]][:4] == ["inputs_embeds", "attention_mask", "position_ids",
                                                          "logits_indices"]
    assert decoder["inputs"][3] == {"name": "logits_indices", "dtype": "int64", "shape": ["batch_size", "num_logits"]}
    assert decoder["inputs"][4] == {"name": "past_key_values.0.key", "dtype": "float32",
                                    "shape": ["batch_size", 2, "past_sequence_length", 16]}
    assert decoder["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch_size", "num_logits", 128]}
    assert decoder["outputs"][1]["shape"] == ["batch_size", 2, "total_sequence_length", 16]
    assert deploy["graphs"]["vision_encoder"]["inputs"][0]["shape"] == ["num_images", 3, 28, 28]


def test_deploy_chat_template_renders_like_build_prompt(onnx_dir):
    jinja2 = pytest.importorskip("jinja2")
    from gmaivl_rt.model.chat import build_prompt

    template = json.loads((onnx_dir / DEPLOY_JSON).read_text())["chat_template"]
    messages = [{"role": "system", "content": "You are a radiologist."},
                {"role": "user", "content": "<image>\nFindings?"},
                {"role": "assistant", "content": "None."}, {"role": "user", "content": "Sure?"}]
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert rendered == build_prompt(messages[1:], system="You are a radiologist.")


def test_attention_is_the_standard_onnx_op(onnx_dir):
    for graph in ("vision_encoder", "decoder_model_merged"):
        nodes = onnx.load(str(onnx_dir / GRAPH_FILES[graph])).graph.node
        attention = [n for n in nodes if n.op_type == "Attention"]
        assert attention and all(n.domain == "" for n in attention)
        assert not [n for n in nodes if n.domain not in ("", "ai.onnx")]
    decoder = onnx.load(str(onnx_dir / GRAPH_FILES["decoder_model_merged"]))
    assert sum(n.op_type == "Attention" for n in decoder.graph.node) == 2  # one per layer


def test_large_graphs_use_external_data(tmp_path, monkeypatch, model):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    onnx_export.export_onnx(model, tmp_path, graphs=("embed_tokens",))
    assert (tmp_path / "embed_tokens.onnx.data").is_file()
    onnx.checker.check_model(str(tmp_path / "embed_tokens.onnx"))
    ids = np.array([[1, 5, 120]], dtype=np.int64)
    (embeds,) = _session(tmp_path, "embed_tokens").run(None, {"input_ids": ids})
    table = model.language_model.embed_tokens.weight.detach()
    np.testing.assert_array_equal(embeds, table[torch.from_numpy(ids)].numpy())


# ------------------------------------------------------------------------------------------ numerics vs torch
@pytest.mark.parametrize("num_images", [1, 3])
def test_vision_encoder_matches_torch_fp32(onnx_dir, model, num_images):
    pixels = torch.randn(num_images, 3, 28, 28)
    (got,) = _session(onnx_dir, "vision_encoder").run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = model.encode_images(pixels)
    assert got.shape == (num_images, N_IMG, 64)
    torch.testing.assert_close(torch.from_numpy(got).reshape(-1, 64), expected, atol=ATOL_FP32, rtol=0)


def test_dynamic_resolution_vision_encoder_matches_torch_fp32(exported, dynamic_checkpoint):
    folder = exported("dynamic")
    model = GMAIVL.from_pretrained(dynamic_checkpoint).eval()
    session = _session(folder, "vision_encoder")
    for height, width in [(28, 42), (56, 28), (14, 14)]:  # export traced 42 x 70
        pixels = torch.randn(2, 3, height, width)
        (got,) = session.run(None, {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            expected = model.encode_images(list(pixels))  # bicubic position embeddings, packed attention
        torch.testing.assert_close(torch.from_numpy(got).reshape(expected.shape), expected, atol=ATOL_FP32, rtol=0)


def test_decoder_prefill_and_decode_match_torch_fp32(onnx_dir, model):
    """Batch 3, left padding, prefill of 12 then three decode steps (past 12, 13, 14) vs the torch model on the
    whole sequences."""
    torch.manual_seed(3)
    ids = torch.randint(0, 110, (3, 15))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :1] = 0, 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    embed, decoder = _session(onnx_dir, "embed_tokens"), _session(onnx_dir, "decoder_model_merged")
    t = model.config.text
    past = [np.zeros((3, t.num_kv_heads, 0, t.head_dim), np.float32)] * (2 * t.num_layers)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    start = 0
    for stop in (12, 13, 14, 15):
        (embeds,) = embed.run(None, {"input_ids": ids[:, start:stop].numpy()})
        logits, *past = decoder.run(None, _decoder_feeds(embeds, mask[:, :stop].numpy(),
                                                         positions[:, start:stop].numpy(), past))
        real = mask[:, start:stop].bool()
        torch.testing.assert_close(torch.from_numpy(logits)[real], expected[:, start:stop][real], atol=ATOL_FP32,
                                   rtol=0)
        assert past[0].shape == (3, t.num_kv_heads, stop, t.head_dim)
        start = stop


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_prefill_returns_logits_of_each_rows_last_real_token_only(model, dtype, exported):
    """Three prompts of lengths 9, 5 and 7 in one (3, 9) prefill: left-padded, right-padded and left-padded
    (the graph takes either side). With `GraphBackend.last_token_indices` the decoder returns (3, 1, V) fp32 logits
    equal to the fp32 torch model's next-token logits of each prompt run alone (fp16 graphs within TOL_FP16).

    Mutants this fails on (each applied by hand): the graph keeping every position (`kept = x` in
    DecoderGraph.forward: shape (3, 9, V)); the graph gathering row 0's index for every row
    (`logits_indices[:1].expand(...)`); `last_token_indices` assuming left padding (always S - 1) or reading
    the first real token."""
    from gmaivl_rt.runtime.graph_backend import GraphBackend

    torch.manual_seed(11)
    lengths, width = (9, 5, 7), 9
    prompts = [torch.randint(0, 110, (n,)) for n in lengths]
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (prompt, right) in enumerate(zip(prompts, (False, True, False))):
        cols = slice(0, len(prompt)) if right else slice(width - len(prompt), width)
        ids[r, cols], mask[r, cols] = prompt, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    indices = GraphBackend.last_token_indices(mask, width)
    folder = exported(dtype)
    (embeds,) = _session(folder, "embed_tokens").run(None, {"input_ids": ids.numpy()})
    t = model.config.text
    past = [np.zeros((3, t.num_kv_heads, 0, t.head_dim), embeds.dtype)] * (2 * t.num_layers)
    logits, *present = _session(folder, "decoder_model_merged").run(
        None, _decoder_feeds(embeds, mask.numpy(), positions.numpy(), past, indices.numpy()))
    assert logits.shape == (3, 1, t.vocab_size) and logits.dtype == np.float32
    assert present[0].shape == (3, t.num_kv_heads, width, t.head_dim)  # the cache still holds every position
    with torch.no_grad():
        expected = torch.stack([model(p[None]).logits[0, -1] for p in prompts])
    tolerance = dict(atol=ATOL_FP32, rtol=0) if dtype == "fp32" else TOL_FP16
    torch.testing.assert_close(torch.from_numpy(logits[:, 0]), expected, **tolerance)


def test_last_token_indices_follow_the_mask_not_the_last_column():
    """Mutants: always S - 1; the first real token; indices over the whole mask instead of its last S columns
    (decode: S = 1 must give 0 whatever the past)."""
    from gmaivl_rt.runtime.graph_backend import GraphBackend

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert GraphBackend.last_token_indices(mask, 5).tolist() == [[4], [2], [4], [2]]
    assert GraphBackend.last_token_indices(torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1), 1).tolist() \
        == [[0]] * 4


def test_fp16_graphs_run_within_tolerance(model, exported):
    folder = exported("fp16")
    pixels = torch.randn(3, 3, 28, 28)
    (features,) = _session(folder, "vision_encoder").run(None, {"pixel_values": pixels.half().numpy()})
    assert features.dtype == np.float16
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(features).float().reshape(-1, 64), model.encode_images(pixels),
                                   **TOL_FP16)
    ids, mask, _ = _prompts(3)
    ids = torch.where(ids == IMAGE_TOKEN, 7, ids)  # text only here
    (embeds,) = _session(folder, "embed_tokens").run(None, {"input_ids": ids.numpy()})
    t = model.config.text
    past = [np.zeros((3, t.num_kv_heads, 0, t.head_dim), np.float16)] * (2 * t.num_layers)
    logits, *_ = _session(folder, "decoder_model_merged").run(
        None, _decoder_feeds(embeds, mask.numpy(), (mask.cumsum(1) - 1).clamp(min=0).numpy(), past))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(torch.from_numpy(logits)[real], expected[real], **TOL_FP16)


# ------------------------------------------------------------------------------------------ generation
def test_greedy_generation_matches_torch_backend_and_transformers(onnx_dir, hf_checkpoint):
    ids, mask, pixels = _prompts(2)
    onnx_backend = gmaivl_rt.load(onnx_dir, backend="onnx")
    torch_backend = gmaivl_rt.load(hf_checkpoint, backend="torch")
    hf = LlavaForConditionalGeneration.from_pretrained(hf_checkpoint).eval()
    got = onnx_backend.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=32, eos_token_id=[],
                                pad_token_id=0)
    ours = torch_backend.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=32,
                                  eos_token_id=[], pad_token_id=0)
    expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=32,
                           min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got.shape == (2, ids.shape[1] + 32)
    assert torch.equal(got, ours)
    assert torch.equal(got, expected)


def test_every_generation_steps_logits_match_transformers(onnx_dir, monkeypatch, hf_checkpoint):
    """The runtime's bookkeeping around the graph (positions, mask, logits_indices) at every step: the logits each
    prefill/decode call returns equal transformers' `output_logits` for the same step (fp32 graphs: 1e-4).

    Mutant: decode positions one ahead (`"position": positions[:, -1:] + 2` in `GraphBackend.generate`) passes the
    greedy-token test above (the tiny random model's argmax does not move) and fails here."""
    ids, mask, pixels = _prompts(2)
    onnx_backend = gmaivl_rt.load(onnx_dir, backend="onnx")
    hf = LlavaForConditionalGeneration.from_pretrained(hf_checkpoint).eval()
    steps = []
    decode = onnx_backend._decode

    def recording_decode(*args):
        logits, past = decode(*args)
        steps.append(logits[:, 0].clone())
        return logits, past

    monkeypatch.setattr(onnx_backend, "_decode", recording_decode)
    got = onnx_backend.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8, eos_token_id=[],
                                pad_token_id=0)
    expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8,
                           min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got, expected.sequences)
    assert len(steps) == len(expected.logits) == 8
    for step, (ours, theirs) in enumerate(zip(steps, expected.logits)):
        torch.testing.assert_close(ours, theirs.float(), atol=ATOL_FP32, rtol=0, msg=lambda m: f"step {step}: {m}")


def test_dynamic_resolution_generation_matches_torch_backend(exported, dynamic_checkpoint):
    """Images of different sizes in one prompt: runs of equal sizes batched through the vision graph."""
    sizes = [(28, 42), (28, 42), (42, 14)]
    counts = [(h // 14) * (w // 14) for h, w in sizes]
    ids = torch.tensor([[5, 6] + sum(([IMAGE_TOKEN] * n + [9] for n in counts), []) + [11]])
    images = [torch.randn(3, h, w) for h, w in sizes]
    got = gmaivl_rt.load(exported("dynamic"), backend="onnx").generate(ids, pixel_values=images, max_new_tokens=16,
                                                                       eos_token_id=[], pad_token_id=0)
    expected = gmaivl_rt.load(dynamic_checkpoint, backend="torch").generate(
        ids, pixel_values=images, max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)


def test_sampling_and_stopping_follow_the_torch_backend(onnx_dir, hf_checkpoint):
    """Same shared sampling code, same random stream: identical samples; eos stops a row, pads the rest."""
    ids, mask, pixels = _prompts(2, seed=5)
    onnx_backend = gmaivl_rt.load(onnx_dir, backend="onnx")
    torch_backend = gmaivl_rt.load(hf_checkpoint, backend="torch")
    settings = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, top_k=50,
                    repetition_penalty=1.12, no_repeat_ngram_size=3, pad_token_id=0)
    got = onnx_backend.generate(ids, pixel_values=pixels, attention_mask=mask,
                                generator=torch.Generator().manual_seed(0), **settings)
    ours = torch_backend.generate(ids, pixel_values=pixels, attention_mask=mask,
                                  generator=torch.Generator().manual_seed(0), **settings)
    assert torch.equal(got, ours)
    eos = int(got[0, ids.shape[1] + 1])  # make the second new token of row 0 its eos
    stopped = onnx_backend.generate(ids, pixel_values=pixels, attention_mask=mask, eos_token_id=eos,
                                    generator=torch.Generator().manual_seed(0), **settings)
    assert torch.equal(stopped, torch_backend.generate(ids, pixel_values=pixels, attention_mask=mask,
                                                       eos_token_id=eos, generator=torch.Generator().manual_seed(0),
                                                       **settings))


# ------------------------------------------------------------------------------------------ errors
def test_wrong_inputs_give_clear_errors(onnx_dir):
    backend = gmaivl_rt.load(onnx_dir, backend="onnx")
    ids, mask, pixels = _prompts(1)
    with pytest.raises(ValueError, match="30x30.*28x28"):
        backend.generate(ids, pixel_values=torch.randn(1, 3, 30, 30), max_new_tokens=1)
    with pytest.raises(ValueError, match="floating point"):
        backend.generate(ids, pixel_values=pixels.to(torch.uint8), max_new_tokens=1)
    with pytest.raises(ValueError, match="4 image tokens but pixel_values give 8"):
        backend.generate(ids, pixel_values=torch.randn(2, 3, 28, 28), max_new_tokens=1)
    with pytest.raises(ValueError, match="integer"):
        backend.generate(ids.float(), pixel_values=pixels, max_new_tokens=1)
    right_padded = torch.ones_like(ids)
    right_padded[0, -1] = 0
    with pytest.raises(ValueError, match="pad prompts on the left"):
        backend.generate(ids, pixel_values=pixels, attention_mask=right_padded, max_new_tokens=1)
    vision = backend.graphs["vision_encoder"]
    with pytest.raises(ValueError, match=r"vision_encoder: input 'pixel_values' must be float32 .*got float64"):
        vision.run({"pixel_values": np.zeros((1, 3, 28, 28))})
    with pytest.raises(ValueError, match=r"of shape \('num_images', 3, 28, 28\), got float32 \(3, 28, 28\)"):
        vision.run({"pixel_values": np.zeros((3, 28, 28), np.float32)})
    with pytest.raises(ValueError, match="missing inputs"):
        backend.graphs["decoder_model_merged"].run({"inputs_embeds": np.zeros((1, 1, 64), np.float32)})


def test_exports_without_logits_indices_are_refused_with_a_way_out(tmp_path, onnx_dir):
    """A folder from before `logits_indices` (its decoder takes no such input): loading says to export again.
    Mutant: no check at load (the first generate then fails on an unknown input, not saying why)."""
    import shutil

    shutil.copytree(onnx_dir, tmp_path / "old")
    deploy = json.loads((onnx_dir / DEPLOY_JSON).read_text())
    deploy["format_version"] = 1
    (tmp_path / "old" / DEPLOY_JSON).write_text(json.dumps(deploy))
    helper = onnx.helper
    old_decoder = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["inputs_embeds"], ["logits"])], "decoder",
        [helper.make_tensor_value_info("inputs_embeds", onnx.TensorProto.FLOAT, ["batch_size", "seq", 64])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch_size", "seq", 64])]),
        opset_imports=[helper.make_opsetid("", 23)])
    onnx.save(old_decoder, str(tmp_path / "old" / GRAPH_FILES["decoder_model_merged"]))
    with pytest.raises(ValueError, match="predates logits_indices.*format_version 1.*export it again"):
        gmaivl_rt.load(tmp_path / "old", backend="onnx")


def test_load_errors(tmp_path, onnx_dir):
    with pytest.raises(ValueError, match="backend 'jax'"):
        gmaivl_rt.load(onnx_dir, backend="jax")
    with pytest.raises(FileNotFoundError, match="gmaivl_deploy.json"):
        gmaivl_rt.load(tmp_path, backend="onnx")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        gmaivl_rt.load(tmp_path / "nothing", backend="onnx")


def test_cli_check_reports_supported_graphs(onnx_dir, capsys):
    from gmaivl_rt.cli import main

    assert main(["export", "check", str(onnx_dir)]) == 0
    out = capsys.readouterr().out
    assert "decoder_model_merged.onnx: opset 23" in out and "all supported by TensorRT" in out


def test_prepare_tokenizes_the_chat_and_expands_images(tiny_model_folder):
    """Tokenizer + template helpers: a folder with our BPE tokenizer, a model whose vocabulary matches it."""
    from PIL import Image

    from gmaivl_rt.model.chat import IMAGE_TOKEN as IMAGE
    from gmaivl_rt.runtime.tokenizer import load_tokenizer

    texts = ["<image>\nIs there a nodule in the left lung?", "No nodule is visible.", "Findings: normal chest."] * 20
    folder = tiny_model_folder(texts, "prepare", text={"vocab_size": 300})
    tokenizer = load_tokenizer(folder)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    config = GMAIVLConfig.from_pretrained(folder)
    assert (config.image_token_index, config.text.vocab_size) == (image_id, len(tokenizer))  # the vocabularies match
    backend = gmaivl_rt.load(folder, backend="torch")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    inputs = backend.prepare([{"role": "user", "content": "<image>\nIs there a nodule?"}], images=[image])
    assert inputs["pixel_values"].shape == (1, 3, 28, 28)
    assert int((inputs["input_ids"] == image_id).sum()) == config.num_image_tokens
    text = tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    out = backend.generate(**inputs, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    # decode is the tokenizer's, special tokens skipped, for a batch or one sequence (it used to assert "a str")
    texts = backend.decode(out[:, -3:])
    assert texts == [tokenizer.decode(out[0, -3:].tolist(), skip_special_tokens=True)]
    assert backend.decode(out[0, -3:]) == texts


def _reference_run(graph_path: Path, feeds: dict) -> list[np.ndarray]:
    """A graph run by ONNX's reference evaluator (ONNX Runtime's CPU provider has no bf16 MatMul or Conv)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(onnx.load(graph_path)).run(None, feeds)


def _float_initializers(model_path: Path) -> dict[str, tuple[str, int]]:
    """name -> (element type, element count) of a graph's floating-point initializers."""
    model = onnx.load(model_path)
    return {t.name: (onnx.TensorProto.DataType.Name(t.data_type), int(np.prod(t.dims)))
            for t in model.graph.initializer
            if t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)}


def test_export_onnx_bf16_from_the_command_line(tmp_path, cli_in_process, hf_checkpoint):
    """`gmaivl-rt export onnx MODEL OUT --dtype bf16` on a transformers-made checkpoint: every floating weight of
    the three graphs is bf16, logits come out fp32, the export passes the TensorRT operator check, and the graphs
    (run by ONNX's reference evaluator in bf16) give the next-token logits of the fp32 torch model within bf16's
    error: at most 4x that of the torch model loaded in bf16 (measured: 2.9e-3..3.9e-3 vs 2.5e-3..2.8e-3 on
    logits up to ~0.45; an fp32 graph is ~1e-6, which the weight dtype check refuses).
    Mutants: the CLI dropping --dtype (fp32 graphs), DTYPES["bf16"] = torch.float16, the decoder's logits left in
    the graph dtype (`.to(torch.float32)` dropped), the decoder skipping its final RMSNorm."""
    pytest.importorskip("onnxscript")
    import ml_dtypes

    out = tmp_path / "onnx_bf16"
    printed = cli_in_process("export", "onnx", hf_checkpoint, out, "--dtype", "bf16")
    assert f"wrote {out} (bf16, opset 23)" in printed and "all supported by TensorRT" in printed
    deploy = json.loads((out / "gmaivl_deploy.json").read_text())
    assert deploy["dtype"] == "bf16"
    head_dim = GMAIVL.from_pretrained(hf_checkpoint).config.text.head_dim
    for graph in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        found = _float_initializers(out / f"{graph}.onnx")
        weights = {name: kind for name, (kind, _) in found.items() if name.endswith((".weight", ".bias"))}
        assert weights and set(weights.values()) == {"BFLOAT16"}, (graph, weights)
        # the one fp32 constant allowed: RoPE's inverse frequencies (head_dim / 2), fp32 in every graph dtype
        fp32 = {name: count for name, (kind, count) in found.items() if kind != "BFLOAT16"}
        assert set(fp32.values()) <= {head_dim // 2} and len(fp32) <= 1, (graph, fp32)
    logits_io = next(o for o in deploy["graphs"]["decoder_model_merged"]["outputs"] if o["name"] == "logits")
    assert logits_io["dtype"] == "float32"

    model = GMAIVL.from_pretrained(hf_checkpoint)
    torch.manual_seed(3)
    ids = torch.cat([torch.randint(0, 100, (3,)), torch.full((4,), IMAGE_TOKEN), torch.randint(0, 100, (5,))])[None]
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = model(ids, pixel_values=pixels).logits[0, -1]
        torch_bf16 = GMAIVL.from_pretrained(hf_checkpoint, dtype=torch.bfloat16)(
            ids, pixel_values=pixels.bfloat16()).logits[0, -1].float()

    got = graph_next_token_logits(out, ids, pixels, IMAGE_TOKEN, _reference_run, float_dtype=ml_dtypes.bfloat16)
    error, torch_error = float((got - expected).abs().max()), float((torch_bf16 - expected).abs().max())
    assert 0 < error <= 4 * torch_error, (error, torch_error, float(expected.abs().max()))
