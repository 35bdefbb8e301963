"""Soft packing: every sample in exactly one pack, whole and in order; cu_seqlens / position_ids consistent with
the samples; labels aligned with tokens; and a pack trains exactly like its samples run one at a time (the tiny
model's packed loss vs the token-weighted mean of unpacked per-sample losses, fp32 tolerance 1e-5)."""
import random

import numpy as np
import pytest
import torch
from train_fixtures import make_dataset

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.train.dataset import IGNORE_INDEX, ImagePolicy, PackedDataset
from gmaivl_rt.train.packing import collate_pack, pack_samples
from gmaivl_rt.train.recipe import _preset_config
from gmaivl_rt.train.tokenizer import conversation_texts, train_bpe_tokenizer


def test_first_fit_places_every_sample_once_and_opens_packs_only_when_needed():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)] + [100, 1, 1]
    packs = pack_samples(lengths, max_length=100, open_packs=8)
    placed = sorted(i for p in packs for i in p.sample_indices)
    assert placed == list(range(len(lengths)))
    for pack in packs:
        assert pack.sample_indices == sorted(pack.sample_indices)  # data order kept inside a pack
        assert pack.length == sum(lengths[i] for i in pack.sample_indices) <= 100
    # Replay: a pack is opened only when the sample fits none of the open packs at that moment.
    first = {p.sample_indices[0]: k for k, p in enumerate(packs)}
    filled = [0] * len(packs)
    for i, n in enumerate(lengths):
        k = next(k for k, p in enumerate(packs) if i in p.sample_indices)
        if i in first:
            assert all(filled[j] + n > 100 for j in range(max(0, k - 8), k))
        filled[k] += n
    # Never more packs than packing strictly in order (one open pack), never fewer than the tokens need.
    assert -(-sum(lengths) // 100) <= len(packs) <= len(pack_samples(lengths, max_length=100, open_packs=1))


def test_pack_rejects_oversized_or_empty_samples():
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        pack_samples([3, 11], max_length=10)
    with pytest.raises(ValueError, match="sample 0 has 0 tokens"):
        pack_samples([0], max_length=10)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data"), records_per_source=(10, 6), sample_ratios=(1.0, 1.0))
    tokenizer = train_bpe_tokenizer(conversation_texts(root), tmp_path_factory.mktemp("tok"), vocab_size=320,
                                    min_frequency=1)
    config = _preset_config(GMAIVLConfig, "tiny", tokenizer)
    dataset = PackedDataset(root, tokenizer, ImagePolicy.from_model_config(config), max_length=150, seed=3)
    return dataset, config


def test_collated_packs_are_consistent_with_their_samples(packed):
    dataset, _ = packed
    assert len(dataset) < len(dataset.samples)  # several samples per pack
    seen = []
    for index, pack in enumerate(dataset.packs):
        batch = dataset[index]
        ids, labels, pos, cu = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0], \
            batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == ids.shape[0] == pack.length
        assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, pack.length)
        for k, sample_index in enumerate(pack.sample_indices):
            sample = dataset.samples[sample_index]
            start, end = int(cu[k]), int(cu[k + 1])
            assert np.array_equal(ids[start:end].numpy(), sample.input_ids)  # whole, unsplit, in order
            assert np.array_equal(labels[start:end].numpy(), sample.labels)
            assert torch.equal(pos[start:end], torch.arange(end - start))
        keep = labels != IGNORE_INDEX
        assert torch.equal(labels[keep], ids[keep])
        assert dataset.num_targets(index) == sum(int((dataset.samples[i].labels[1:] != IGNORE_INDEX).sum())
                                                 for i in pack.sample_indices)
        seen += pack.sample_indices
    assert sorted(seen) == list(range(len(dataset.samples)))


def test_packed_loss_equals_unpacked_per_sample_losses(packed):
    dataset, config = packed
    torch.manual_seed(0)
    model = GMAIVL(config).eval()
    index = max(range(len(dataset)), key=lambda i: len(dataset.packs[i].sample_indices))
    pack = dataset.packs[index]
    batch = dataset[index]
    with torch.no_grad():
        packed_loss = model(batch["input_ids"], pixel_values=batch["pixel_values"],
                            position_ids=batch["position_ids"], labels=batch["labels"],
                            cu_seqlens=batch["cu_seqlens"]).loss
        total, count = 0.0, 0
        for sample_index in pack.sample_indices:
            sample = dataset.samples[sample_index]
            single = collate_pack([sample], [dataset.image_policy.load(p) for p in sample.image_paths])
            out = model(single["input_ids"], pixel_values=single["pixel_values"], labels=single["labels"])
            total += float(out.loss) * sample.num_targets
            count += sample.num_targets
    assert len(pack.sample_indices) >= 2
    torch.testing.assert_close(float(packed_loss), total / count, rtol=1e-5, atol=1e-5)
