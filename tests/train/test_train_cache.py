"""The training input cache: a second start on the same data reads the encoded samples instead of tokenizing,
gives bit-identical packs and losses, and any change of data or tokenizer makes it tokenize again."""
import json

import numpy as np
from train_fixtures import make_training_setup

from gmaivl_rt.model.config import GMAIVLConfig
from gmaivl_rt.train.recipe import train
from gmaivl_rt.train.dataset import ImagePolicy, PackedDataset
from gmaivl_rt.runtime.tokenizer import load_tokenizer
from gmaivl_rt.train.tokenizer import conversation_texts, train_bpe_tokenizer


def _dataset(data, tokenizer, **kwargs):
    policy = ImagePolicy.from_model_config(GMAIVLConfig.preset("tiny"))
    return PackedDataset(data, tokenizer, policy, max_length=150, seed=3, progress=False, **kwargs)


def _same_samples(a, b):
    assert len(a.samples) == len(b.samples) > 0
    for x, y in zip(a.samples, b.samples):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
        assert x.image_paths == y.image_paths and x.record_id == y.record_id and x.truncated == y.truncated
    assert [p.sample_indices for p in a.packs] == [p.sample_indices for p in b.packs]
    assert [a.num_targets(i) for i in range(len(a))] == [b.num_targets(i) for i in range(len(b))]


def test_second_start_reads_the_cache_and_matches_tokenizing(tmp_path):
    data, tok_dir = make_training_setup(tmp_path, records_per_source=(10, 6))
    tokenizer = load_tokenizer(tok_dir)
    direct = _dataset(data, tokenizer, cache_dir=None)
    assert direct.tokenized_records == 16
    first = _dataset(data, tokenizer)
    assert first.tokenized_records == 16 and len(list((data / ".cache" / "tokenized").glob("*.npz"))) == 2
    second = _dataset(data, tokenizer)
    assert second.tokenized_records == 0 and second.stats()["tokenized_records"] == 0
    _same_samples(direct, second)
    _same_samples(first, second)
    assert second.num_truncated == direct.num_truncated
    batch_a, batch_b = direct[0], second[0]
    assert all(np.array_equal(batch_a[k], batch_b[k]) for k in ("input_ids", "labels", "cu_seqlens"))


def test_a_changed_annotation_file_or_tokenizer_misses(tmp_path):
    data, tok_dir = make_training_setup(tmp_path, records_per_source=(10, 6))
    tokenizer = load_tokenizer(tok_dir)
    _dataset(data, tokenizer)
    annotations = data / "annotations" / "source1.jsonl"
    lines = annotations.read_text().splitlines()
    record = json.loads(lines[0])
    record["conversations"][1]["value"] = "The region is plainly visible."
    annotations.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    edited = _dataset(data, tokenizer)
    assert edited.tokenized_records == 6  # only the edited source is tokenized again
    _same_samples(edited, _dataset(data, tokenizer, cache_dir=None))
    assert len(list((data / ".cache" / "tokenized").glob("source1-*.npz"))) == 1  # the stale entry is gone

    train_bpe_tokenizer(conversation_texts(data), tmp_path / "other_tok", vocab_size=300, min_frequency=1)
    other = load_tokenizer(tmp_path / "other_tok")
    assert _dataset(data, other).tokenized_records == 16
    _same_samples(_dataset(data, other), _dataset(data, other, cache_dir=None))


def test_a_second_stage_start_does_not_tokenize_and_trains_identically(tmp_path):
    data, tokenizer = make_training_setup(tmp_path, records_per_source=(8, 4))
    common = dict(preset="tiny", tokenizer=tokenizer, progress=False,
                  overrides={"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 3}})
    first = train(3, data, tmp_path / "a", **common)
    again = train(3, data, tmp_path / "b", **common)
    assert first["data"]["tokenized_records"] == 12 and again["data"]["tokenized_records"] == 0
    assert again["losses"] == first["losses"]
