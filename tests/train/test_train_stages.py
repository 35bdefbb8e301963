"""The three stages on the tiny preset: which parameters each stage changes (and which stay bit-identical), and
the loss on the whole (demo-like) fixture dataset falls from stage to stage.

The parameters that can change are decided independently of the trainer: the stage config's trainable prefixes
intersected with the parameters autograd gives a non-zero gradient (the vision tower's last layer and
post_layernorm never run with feature_layer -2, so even a trainable one stays put)."""
import pytest
import torch
from run_outputs import model_weights
from train_fixtures import eval_loss, make_init_model, make_training_setup

from gmaivl_rt import GMAIVL
from gmaivl_rt.runtime.tokenizer import load_tokenizer
from gmaivl_rt.train.config import load_train_config
from gmaivl_rt.train.dataset import ImagePolicy, PackedDataset
from gmaivl_rt.train.recipe import train

OVERRIDES = {"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 5, "warmup_ratio": 0.0}}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    data, tokenizer_dir = make_training_setup(root)
    make_init_model(root / "init", tokenizer_dir)
    dirs, init = {0: root / "init"}, root / "init"
    for stage in (1, 2, 3):
        train(stage, data, root / f"s{stage}", preset="tiny", init=init, tokenizer=tokenizer_dir,
              overrides=OVERRIDES, progress=False)
        init = dirs[stage] = root / f"s{stage}"
    return data, tokenizer_dir, dirs




def _params_with_gradient(model_dir, data, tokenizer_dir) -> set[str]:
    """Names (on-disk) of the parameters that get a non-zero gradient from the training loss, by autograd."""
    from gmaivl_rt.model.checkpoint import disk_name

    model = GMAIVL.from_pretrained(model_dir)
    dataset = PackedDataset(data, load_tokenizer(tokenizer_dir), ImagePolicy.from_model_config(model.config),
                            max_length=256, progress=False)
    batch = dataset[0]
    model(batch["input_ids"], pixel_values=batch["pixel_values"], position_ids=batch["position_ids"],
          labels=batch["labels"], cu_seqlens=batch["cu_seqlens"]).loss.backward()
    return {disk_name(n) for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_changes_exactly_its_trainable_parameters(stages, stage):
    from gmaivl_rt.model.checkpoint import disk_name

    data, tokenizer_dir, dirs = stages
    before, after = model_weights(dirs[stage - 1]), model_weights(dirs[stage])
    assert before.keys() == after.keys()
    prefixes = load_train_config(stage)["trainable"]
    model = GMAIVL.from_pretrained(dirs[stage - 1])
    trainable = {disk_name(n) for n, _ in model.named_parameters()
                 if any(n == p or n.startswith(p + ".") for p in prefixes)}
    with_gradient = _params_with_gradient(dirs[stage - 1], data, tokenizer_dir)
    should_change = trainable & with_gradient
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == should_change
    unchanged_trainable = trainable - with_gradient
    last = model.config.vision.num_layers - 1
    if stage == 1:
        assert {k.split(".")[0] for k in changed} == {"multi_modal_projector"}
        assert len(changed) == 4  # linear_1/linear_2 weight and bias
    else:
        # Only the unused tail of the vision tower stays put among the trainable parameters.
        assert unchanged_trainable and all(f"encoder.layers.{last}." in k or "post_layernorm" in k
                                           for k in unchanged_trainable)
        assert any(k.startswith("vision_tower.") for k in changed)
    if stage == 3:
        assert any("language_model" in k for k in changed) and any("lm_head" in k for k in changed)
    else:
        assert not any("language_model" in k or "lm_head" in k for k in changed)


def test_loss_falls_across_the_stages(stages):
    data, tokenizer_dir, dirs = stages
    losses = [eval_loss(dirs[s], data, tokenizer_dir) for s in (0, 1, 2, 3)]
    print("eval loss after stages 0..3:", losses)
    assert losses[0] > losses[1] > losses[2] > losses[3], losses


def test_stage_outputs(stages):
    import json

    _, _, dirs = stages
    out = dirs[3]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in history] == [1] * 5 + [2] * 5 + [3] * 5
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    for record in log:
        assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"}
        assert record["tokens_per_s"] > 0 and record["grad_norm"] > 0
    assert [r["lr"] for r in log][0] == pytest.approx(1e-5)  # stage III's rate, no warm-up in this run
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tokenizer.json").is_file() and (out / "train_config.yaml").is_file()


def test_stage_configs_carry_the_paper_schedule():
    lrs = [load_train_config(s, preset="gmai-vl-7b")["optimizer"]["lr"] for s in (1, 2, 3)]
    assert lrs == [1e-3, 1e-4, 1e-5]
    cfg = load_train_config(1, preset="gmai-vl-7b")
    assert cfg["optimizer"]["betas"] == [0.9, 0.999] and cfg["optimizer"]["weight_decay"] == 0.0
    assert cfg["data"]["max_length"] == 2048 and cfg["batch"]["global_batch_size"] == 512
    assert cfg["distributed"]["strategy"] == "fsdp"
    with pytest.raises(ValueError, match="stage must be one of"):
        load_train_config(4)


def test_step_options_activation_checkpointing_bf16_and_loader_workers(tmp_path):
    """Activation checkpointing recomputes the same numbers and a DataLoader worker feeds the same packs (fp32:
    identical losses); bf16 autocast trains close to fp32 (8 mantissa bits: rtol 2e-2 on the losses of 3 steps)."""
    data, tokenizer_dir = make_training_setup(tmp_path, records_per_source=(8, 4))
    common = dict(preset="tiny", tokenizer=tokenizer_dir, progress=False)
    base = {"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 3}}
    variants = {"fp32": {}, "checkpointed": {"train": {"activation_checkpointing": True}},
                "bf16": {"train": {"precision": "bf16"}}, "worker": {"data": {"num_workers": 1}}}
    runs = {name: train(3, data, tmp_path / name, overrides={**base, **extra}, **common)["losses"]
            for name, extra in variants.items()}
    assert runs["checkpointed"] == runs["fp32"] and runs["worker"] == runs["fp32"]
    torch.testing.assert_close(runs["bf16"], runs["fp32"], rtol=2e-2, atol=0)
    assert runs["bf16"] != runs["fp32"]  # autocast really ran in bf16


def test_dynamic_resolution_model_trains(tmp_path):
    """A native-resolution model (images kept at their aspect ratio, per-image patch grids) trains through the same
    recipe: stage II moves the vision tower, and the saved model keeps dynamic_resolution."""
    data, tokenizer_dir = make_training_setup(tmp_path, records_per_source=(8, 4))
    make_init_model(tmp_path / "init", tokenizer_dir,
                    vision={"dynamic_resolution": True, "min_pixels": 14 * 14, "max_pixels": 56 * 56})
    result = train(2, data, tmp_path / "s2", init=tmp_path / "init", tokenizer=tokenizer_dir, progress=False,
                   overrides={"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 3}})
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    before, after = model_weights(tmp_path / "init"), model_weights(tmp_path / "s2")
    assert not torch.equal(before["vision_tower.embeddings.patch_embedding.weight"],
                           after["vision_tower.embeddings.patch_embedding.weight"])
    assert GMAIVL.from_pretrained(tmp_path / "s2").config.vision.dynamic_resolution


def test_config_model_block_changes_the_preset_dimensions(tmp_path):
    """A config's `model` block changes the preset's dimensions for a run from random weights (the demo uses it for
    a smaller language model): the saved config.json, read by transformers' LlavaConfig, has them, and a field the
    model has not is refused naming it. Mutant seen failing: the block ignored (`_preset_config` without it)."""
    from transformers import LlavaConfig

    data, tokenizer_dir = make_training_setup(tmp_path, records_per_source=(4, 2))
    block = {"text": {"num_layers": 1, "intermediate_size": 96}, "vision": {"num_layers": 1}}
    overrides = {"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 1}, "model": block}
    train(3, data, tmp_path / "s3", preset="tiny", tokenizer=tokenizer_dir, progress=False, overrides=overrides)
    hf = LlavaConfig.from_pretrained(tmp_path / "s3")
    assert (hf.text_config.num_hidden_layers, hf.text_config.intermediate_size) == (1, 96)
    assert hf.vision_config.num_hidden_layers == 1
    overrides["model"] = {"text": {"num_layayers": 1}}
    with pytest.raises(ValueError, match="num_layayers"):
        train(3, data, tmp_path / "bad", preset="tiny", tokenizer=tokenizer_dir, progress=False, overrides=overrides)


def assert_trained_alike(init, want, got, atol, moved_by):
    """Every parameter the reference run changed moved by more than `moved_by` (a threshold well above `atol`, so
    an untrained model cannot pass the comparison), `got` changed the same parameters, and its weights are within
    `atol` of `want`'s."""
    changed = {k for k in want if not torch.equal(want[k], init[k])}
    assert changed and changed == {k for k in got if not torch.equal(got[k], init[k])}
    for key in changed:
        # a key projection's bias has an exactly zero gradient (softmax ignores a per-row shift): rounding noise only
        if not key.endswith("k_proj.bias"):
            assert float((want[key] - init[key]).abs().max()) > moved_by, key
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def test_training_step_runs_on_the_triton_kernels(tmp_path, monkeypatch):
    """The same 2 steps with every op on its Triton kernel (interpreted on CPU) and on the PyTorch references, from
    one initial checkpoint at lr 1e-3 (AdamW: each weight moves ~1e-3 per step): fp32 losses within 1e-5 and weights
    within 1e-5 (different reduction orders in the kernels), 20x below the smallest change they guard (every changed
    tensor moved by more than 2e-4). Adam's eps is 1e-6 here: at the default 1e-8 a gradient at rounding level still
    takes most of an lr-sized step, its sign the rounding's (one weight of 8192 was 1.3e-5 apart under
    OMP_NUM_THREADS=1); at 1e-6 a gradient g below it moves its weight by about lr * g / 1e-6 (1e-6 for g = 1e-9),
    while the smallest real gradients here (the vision tower's first layer, ~1e-5) still take most of an lr step.
    Mutant: `optimizer.step()` dropped from the recipe (both runs stay at the initial weights and agree: the old
    lr-1e-5 comparison passed it; the moved check fails)."""
    data, tokenizer_dir = make_training_setup(tmp_path, records_per_source=(4, 2))
    make_init_model(tmp_path / "init", tokenizer_dir)
    overrides = {"batch": {"global_batch_size": 1}, "schedule": {"total_steps": 2, "warmup_ratio": 0.0},
                 "data": {"max_length": 96}, "optimizer": {"lr": 1e-3, "eps": 1e-6}}
    losses = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("GMAIVL_KERNELS", mode)
        losses[mode] = train(3, data, tmp_path / mode, init=tmp_path / "init", tokenizer=tokenizer_dir,
                             overrides=overrides, progress=False)["losses"]
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-5)
    assert_trained_alike(model_weights(tmp_path / "init"), model_weights(tmp_path / "torch"),
                         model_weights(tmp_path / "triton"), atol=1e-5, moved_by=2e-4)


def test_loss_falls_across_the_stages_on_the_demo_data(tmp_path):
    """The embedded demo dataset (pydicom's and nibabel's files), the tiny preset, a few steps per stage at the
    demo config's rates: the loss over the whole demo data falls after every stage."""
    from gmaivl_rt.data.build import build_dataset
    from gmaivl_rt.train.config import CONFIG_DIR
    from gmaivl_rt.train.tokenizer import conversation_texts, train_bpe_tokenizer

    data = tmp_path / "data"
    build_dataset(data, demo=True, progress=False)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer = train_bpe_tokenizer(conversation_texts(data), tokenizer_dir, vocab_size=512)
    make_init_model(tmp_path / "s0", tokenizer)
    overrides = {"batch": {"global_batch_size": 2}, "data": {"max_length": 256},
                 "stages": {s: {"schedule": {"total_steps": 6, "warmup_ratio": 0.0}} for s in (1, 2, 3)}}
    for stage in (1, 2, 3):
        train(stage, data, tmp_path / f"s{stage}", config=CONFIG_DIR / "demo.yaml", preset="tiny",
              init=tmp_path / f"s{stage - 1}", tokenizer=tokenizer_dir, overrides=overrides, progress=False)
    losses = [eval_loss(tmp_path / f"s{s}", data, tokenizer_dir) for s in (0, 1, 2, 3)]
    print("demo-data loss after stages 0..3:", losses)
    assert losses[0] > losses[1] > losses[2] > losses[3], losses


def test_a_negative_image_cache_is_refused_naming_it():
    """data.image_cache_mb (decoded pictures kept per process) must be >= 0; 0 turns the cache off."""
    assert load_train_config(3, "tiny", None, {"data": {"image_cache_mb": 0}})["data"]["image_cache_mb"] == 0
    with pytest.raises(ValueError, match=r"data\.image_cache_mb must be >= 0"):
        load_train_config(3, "tiny", None, {"data": {"image_cache_mb": -1}})
