"""Vision pretraining (`gmaivl_rt.train.vision_pretrain`): it teaches the vision tower what its labels ask about,
judged by an independent linear probe on held-out pictures, and it touches nothing but the tower and the projector;
bad input fails naming it. (What it does for the demo's answers: docs/evaluation.md.)"""
import pytest
import torch

from gmaivl_rt.data.synth.pictures import IGNORE
from gmaivl_rt.errors import InputError
from gmaivl_rt.model.config import PRESETS
from gmaivl_rt.model.modeling import GMAIVL
from gmaivl_rt.train.vision_pretrain import pretrain_vision



def _model() -> GMAIVL:
    """The tiny preset: 28-pixel pictures in 14-pixel patches (4 image tokens)."""
    torch.manual_seed(0)
    return GMAIVL(PRESETS["tiny"])


def _squares(count: int, seed: int) -> tuple[torch.Tensor, dict]:
    """(count, 3, 28, 28) faint-noise pictures, each with a bright 6-pixel square somewhere in its left or right half,
    and {"side": (count,) 0 left / 1 right}: a label only the square's place gives."""
    g = torch.Generator().manual_seed(seed)
    pictures = torch.randn(count, 3, 28, 28, generator=g) * 0.1
    side = torch.randint(0, 2, (count,), generator=g)
    for i in range(count):
        y = int(torch.randint(0, 22, (1,), generator=g))
        x = int(torch.randint(0, 8, (1,), generator=g)) + 14 * int(side[i])
        pictures[i, :, y:y + 6, x:x + 6] = 2.0
    return pictures, {"side": side}


def _probe_accuracy(model, train_x, train_y, test_x, test_y) -> float:
    """A logistic regression fitted (L-BFGS, L2) on the mean projected image token of train_x and scored on test_x:
    how plainly the tower's output shows the label, independent of the pretraining's own heads."""
    with torch.no_grad():
        def pooled(x):
            return model.encode_images(x).view(x.shape[0], -1, model.config.text.hidden_size).mean(1)
        a, b = pooled(train_x), pooled(test_x)
    mean, std = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mean) / std, (b - mean) / std
    keep, keep_test = train_y != IGNORE, test_y != IGNORE
    weight = torch.zeros(a.shape[1], int(train_y[keep].max()) + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(a[keep] @ weight, train_y[keep]) + 1e-2 * weight.pow(2).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return float(((b[keep_test] @ weight).argmax(-1) == test_y[keep_test]).float().mean())


def test_pretraining_makes_the_mean_token_show_the_labels_and_nothing_else_moves():
    """After 120 steps on 1024 pictures, a probe on the MEAN image token (where the heads sit) reads the square's
    side on 256 held-out pictures at >= 95 % with at most a quarter of the untrained tower's errors (averaging the
    tokens loses most of where the square was until the tower learns to carry it); the language model and its head are bit
    for bit as they were, the tower and projector are not. Mutant seen failing: the optimizer given the heads only
    (the tower never moves). Heads on the first token instead of the mean pass it (that token learns the side and
    the mean with it): the demo's figures are what judge the choice of the mean (docs/evaluation.md)."""
    train_x, train_y = _squares(1024, 0)
    test_x, test_y = _squares(256, 1)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    untrained = _probe_accuracy(model, train_x, train_y["side"], test_x, test_y["side"])

    summary = pretrain_vision(model, train_x, train_y, steps=120, batch_size=32, lr=2e-3, progress=False)

    trained = _probe_accuracy(model, train_x, train_y["side"], test_x, test_y["side"])
    assert trained >= 0.95 and 1 - trained <= (1 - untrained) / 4, (untrained, trained, summary["heldout_accuracy"])
    assert summary["steps"] == len(summary["losses"]) == 120 and summary["losses"][-1] < summary["losses"][0]
    after = model.state_dict()
    for name, value in before.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        assert torch.equal(after[name], value), name
    assert not torch.equal(after["vision_tower.embeddings.patch_embedding.weight"],
                           before["vision_tower.embeddings.patch_embedding.weight"])
    assert not any(p.requires_grad for p in model.parameters())


def test_bad_input_fails_naming_it():
    train_x, train_y = _squares(16, 0)
    with pytest.raises(InputError, match="label 'side'.*match the pictures"):
        pretrain_vision(_model(), train_x, {**train_y, "side": train_y["side"][:-1]}, steps=1, batch_size=4,
                        lr=1e-3, progress=False)
    with pytest.raises(InputError, match=r"pictures: expected \(N, 3, 28, 28\)"):
        pretrain_vision(_model(), train_x[:, :, :14, :14], train_y, steps=1, batch_size=4, lr=1e-3, progress=False)
    with pytest.raises(InputError, match="each must be >= 1"):
        pretrain_vision(_model(), train_x, train_y, steps=0, batch_size=4, lr=1e-3, progress=False)
