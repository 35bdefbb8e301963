"""The training dataset: meta-list + JSONL -> chat-templated, label-masked samples with `<image>` expanded.

Independent checks: the token stream decodes to what transformers' own chat-template renderer (jinja, in the
tokenizer) produces; labels cover exactly the assistant replies with their `<|im_end|>`; image token counts follow
the model config / `vision_sizes.dynamic_resize_shape`."""
import json
import logging

import pytest
import torch
from train_fixtures import make_dataset

from gmaivl_rt import GMAIVLConfig
from gmaivl_rt.model.chat import IM_END, expand_image_tokens
from gmaivl_rt.train.dataset import (IGNORE_INDEX, ConversationEncoder, ImagePolicy, PackedDataset, load_meta,
                                     sample_records)
from gmaivl_rt.runtime.tokenizer import image_token_id
from gmaivl_rt.train.tokenizer import conversation_texts, train_bpe_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data"), records_per_source=(9, 8), sample_ratios=(1.0, 0.5))
    tokenizer = train_bpe_tokenizer(conversation_texts(root), tmp_path_factory.mktemp("tok"), vocab_size=320,
                                    min_frequency=1)
    return root, tokenizer


def _messages(record):
    role = {"human": "user", "gpt": "assistant"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in record["conversations"]]


def _encoder(tokenizer, max_length=512, tokens_per_image=4):
    return ConversationEncoder(tokenizer, image_token_id(tokenizer), lambda path, record: tokens_per_image,
                               max_length)


def test_sample_ratio_subsets_are_seeded_and_sized(data):
    root, _ = data
    sources = load_meta(root)
    picked = sample_records(sources, seed=1)
    by_source = [sum(1 for s, _ in picked if s.name == name) for name in ("source0", "source1")]
    assert by_source == [9, 4]  # ratio 1.0 keeps all 9, ratio 0.5 takes round(8 * 0.5)
    assert [r["id"] for _, r in picked] == [r["id"] for _, r in sample_records(sources, seed=1)]
    assert {r["id"] for _, r in sample_records(sources, seed=2)} != {r["id"] for _, r in picked} or \
        {r["id"] for _, r in sample_records(sources, seed=3)} != {r["id"] for _, r in picked}
    meta = json.loads((root / "meta.json").read_text())
    meta["source1"]["sample_ratio"] = 2.0
    (root / "meta2.json").write_text(json.dumps(meta))
    doubled = sample_records(load_meta(root / "meta2.json"), seed=0)
    assert sum(1 for s, _ in doubled if s.name == "source1") == 16


def test_tokens_match_the_jinja_chat_template_and_labels_cover_exactly_the_replies(data):
    root, tokenizer = data
    encoder = _encoder(tokenizer, tokens_per_image=5)
    source = load_meta(root)[0]
    records = [r for _, r in sample_records([source], seed=0)]
    multi_turn = [r for r in records if len(r["conversations"]) > 2]
    assert multi_turn, "fixture should hold multi-turn records"
    for record in records[:6] + multi_turn[:2]:
        sample = encoder.encode(record, source.image_dir)
        rendered = tokenizer.apply_chat_template(_messages(record), tokenize=False)
        assert tokenizer.decode(sample.input_ids) == expand_image_tokens(rendered, 5)
        labelled = sample.labels != IGNORE_INDEX
        assert (sample.labels[labelled] == sample.input_ids[labelled]).all()
        runs, current = [], []
        for token, keep in zip(sample.input_ids.tolist(), labelled.tolist()):
            if keep:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        runs += [current] if current else []
        replies = [t["value"] + IM_END for t in record["conversations"] if t["from"] == "gpt"]
        assert [tokenizer.decode(r) for r in runs] == replies
        assert not labelled[sample.input_ids == image_token_id(tokenizer)].any()


def test_image_tokens_and_pixels_fixed_resolution(data):
    root, tokenizer = data
    cfg = GMAIVLConfig.preset("tiny")
    dataset = PackedDataset(root, tokenizer, ImagePolicy.from_model_config(cfg), max_length=128, seed=0)
    image_id = image_token_id(tokenizer)
    for i in range(len(dataset)):
        batch = dataset[i]
        n_images = batch["pixel_values"].shape[0]
        assert batch["pixel_values"].shape == (n_images, 3, 28, 28) and batch["pixel_values"].dtype == torch.float32
        assert int((batch["input_ids"] == image_id).sum()) == n_images * cfg.num_image_tokens
        assert n_images == len(batch["cu_seqlens"]) - 1  # one image per fixture record


def test_dynamic_resolution_token_counts(data):
    root, tokenizer = data
    from gmaivl_rt.model.vision_sizes import dynamic_resize_shape

    cfg = GMAIVLConfig.preset("tiny").replace(vision={"dynamic_resolution": True, "min_pixels": 14 * 14,
                                                      "max_pixels": 56 * 56})
    policy = ImagePolicy.from_model_config(cfg)
    dataset = PackedDataset(root, tokenizer, policy, max_length=256, seed=0)
    h, w = dynamic_resize_shape(32, 40, 14, 14 * 14, 56 * 56)  # fixture images are 40 x 32
    batch = dataset[0]
    assert isinstance(batch["pixel_values"], list)
    assert all(tuple(p.shape) == (3, h, w) for p in batch["pixel_values"])
    n_image_tokens = int((batch["input_ids"] == image_token_id(tokenizer)).sum())
    assert n_image_tokens == len(batch["pixel_values"]) * (h // 14) * (w // 14)


def test_long_sample_truncated_with_warning_never_inside_an_image(data, tmp_path, caplog):
    _, tokenizer = data
    root = make_dataset(tmp_path, records_per_source=(2,), sample_ratios=(1.0,), long_answer_words=300)
    source = load_meta(root)[0]
    record = next(r for _, r in sample_records([source], seed=0))
    encoder = _encoder(tokenizer, max_length=64, tokens_per_image=8)
    with caplog.at_level(logging.WARNING):
        sample = encoder.encode(record, source.image_dir)
    assert len(sample) == 64 and "truncated to 64 tokens" in caplog.text
    assert sample.num_targets > 0 and len(sample.image_paths) == 1

    # A cut that would land inside the image tokens moves to just before them; the image is dropped whole.
    full = _encoder(tokenizer, max_length=4096, tokens_per_image=8).encode(record, source.image_dir)
    image_id = image_token_id(tokenizer)
    first_image = int((full.input_ids == image_id).nonzero()[0][0])
    cut_inside = _encoder(tokenizer, max_length=first_image + 3, tokens_per_image=8).encode(record, source.image_dir)
    assert len(cut_inside) == first_image and cut_inside.image_paths == []
    assert not (cut_inside.input_ids == image_id).any()

    with pytest.raises(ValueError, match="takes 80 tokens, more than max_length 64"):
        _encoder(tokenizer, max_length=64, tokens_per_image=80).encode(record, source.image_dir)


def test_bad_inputs_name_the_problem(data, tmp_path):
    root, tokenizer = data
    with pytest.raises(FileNotFoundError, match="no meta-list"):
        load_meta(tmp_path)
    bad = tmp_path / "bad"
    make_dataset(bad, records_per_source=(2,), sample_ratios=(1.0,))
    with open(bad / "annotations" / "source0.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"source0.jsonl:3 is not valid JSON"):
        sample_records(load_meta(bad), seed=0)
    record = {"id": "x", "image": ["a.png", "b.png"],
              "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]}
    with pytest.raises(ValueError, match="1 <image> placeholders for 2 images"):
        _encoder(tokenizer).encode(record, tmp_path)
    with pytest.raises(ValueError, match="no assistant"):
        _encoder(tokenizer).encode({"id": "y", "conversations": [{"from": "human", "value": "Hi"}]}, tmp_path)


def test_demo_balanced_meta_list_evens_out_sources(tmp_path):
    from gmaivl_rt.demo import balanced_meta_list

    root = make_dataset(tmp_path / "data", records_per_source=(12, 4), sample_ratios=(1.0, 1.0))
    meta = balanced_meta_list(root, tmp_path / "balanced.json")
    picked = sample_records(load_meta(meta), seed=0)
    assert [sum(1 for s, _ in picked if s.name == n) for n in ("source0", "source1")] == [12, 12]
    assert all((s.image_dir / r["image"]).is_file() for s, r in picked)


def test_image_policy_keeps_decoded_pictures_within_its_byte_budget(tmp_path):
    """A picture read once comes back from the policy's cache (it still loads after its file is gone), equal to
    the model's own preprocessing of the file and a fresh tensor each time (changing one leaves the next alone);
    with a budget smaller than one picture nothing is kept."""
    import numpy as np
    from PIL import Image

    from gmaivl_rt.model.preprocess import preprocess_image

    path = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(path)
    vision = GMAIVLConfig.preset("tiny").vision
    want = preprocess_image(Image.open(path).convert("RGB"), vision.image_size)
    policy, uncached = ImagePolicy(vision), ImagePolicy(vision, cache_bytes=want.numel() * 4 - 1)
    policy.load(path).zero_()
    uncached.load(path)
    path.unlink()
    policy.load(path).zero_()
    assert torch.equal(policy.load(path), want)
    with pytest.raises(FileNotFoundError):
        uncached.load(path)
