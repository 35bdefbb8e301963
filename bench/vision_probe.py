"""Can the compact ViT, trained from random weights, see what the generated corpus asks about? A vision-only probe:
the vision tower + projector with one linear head per question type on the flattened image tokens, trained with
cross-entropy on freshly rendered scenes (`gmaivl_rt.data.synth`, read by the converter's own reader) and scored on
scenes of an unseen seed. It separates "the pixels do not show it" from "the VLM did not learn to read it".

    python bench/vision_probe.py [--scenes 400] [--steps 300] [--batch 16] [--lr 1e-3] [--patch 28]

Prints held-out accuracy per question type every --every steps (chance: modality/region/count 25 %, plane 33 %,
presence/side/size 50 %). Not a test: one to a few minutes of CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch


def _labels():
    from gmaivl_rt.data.synth.questions import QUESTION_TYPES, answer_pool, applicable, true_answer

    def label(scene, qtype):
        return answer_pool(qtype).index(true_answer(scene, qtype)) if qtype in applicable(scene) else -100
    return QUESTION_TYPES, label, answer_pool


def rendered(seed: int, count: int, image_size: int) -> torch.Tensor:
    """(count, 3, S, S) CLIP-normalised pictures of scenes 0..count-1 of `seed`, as `data build` reads them."""
    from PIL import Image

    from gmaivl_rt.data.synth import render
    from gmaivl_rt.data.synth.scenes import draw_scene
    from gmaivl_rt.medical.convert import to_medical_image
    from gmaivl_rt.model.preprocess import preprocess_image

    pictures = []
    for index in range(count):
        scene = draw_scene(seed, index)
        _, data = render.render_file(scene)
        where = {"slice_index": render.slice_index(scene), "plane": scene.plane} if scene.kind == "nifti" else {}
        pictures.append(preprocess_image(Image.fromarray(to_medical_image(data, **where).pixels), image_size))
    return torch.stack(pictures)


def main(argv=None) -> int:
    from gmaivl_rt.data.synth.scenes import draw_scene
    from gmaivl_rt.model.config import PRESETS
    from gmaivl_rt.model.modeling import GMAIVL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=400)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patch", type=int, default=None, help="patch size (default: the compact preset's)")
    p.add_argument("--every", type=int, default=50)
    args = p.parse_args(argv)

    cfg = PRESETS["compact"]
    if args.patch:
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, patch_size=args.patch))
    types, label, pool = _labels()
    started = time.perf_counter()
    data = {}
    for name, seed, count in (("train", 0, args.scenes), ("heldout", 777_001, args.heldout)):
        scenes = [draw_scene(seed, i) for i in range(count)]
        data[name] = (rendered(seed, count, cfg.vision.image_size),
                      torch.tensor([[label(s, t) for t in types] for s in scenes]))
    print(f"rendered {args.scenes} + {args.heldout} scenes in {time.perf_counter() - started:.0f} s", flush=True)

    torch.manual_seed(0)
    model = GMAIVL(cfg)
    width = cfg.text.hidden_size * cfg.vision.tokens_per_image()
    heads = torch.nn.ModuleList([torch.nn.Linear(width, len(pool(t))) for t in types])
    params = [*model.vision_tower.parameters(), *model.multi_modal_projector.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, round(0.05 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) *
                                              (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))

    def features(x):  # (N, 3, S, S) -> (N, tokens * hidden)
        return model.encode_images(x).view(x.shape[0], -1)

    x_train, y_train = data["train"]
    x_test, y_test = data["heldout"]
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        idx = torch.randint(0, len(y_train), (args.batch,), generator=generator)
        f, y = features(x_train[idx]), y_train[idx]
        loss = sum(torch.nn.functional.cross_entropy(heads[k](f), y[:, k], ignore_index=-100)
                   for k in range(len(types)) if (y[:, k] >= 0).any())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            with torch.no_grad():
                f = features(x_test)
                scores = {t: float((heads[k](f[y_test[:, k] >= 0]).argmax(-1) ==
                                    y_test[y_test[:, k] >= 0, k]).float().mean()) for k, t in enumerate(types)}
            print(f"step {step + 1}: " + ", ".join(f"{t} {100 * a:.0f} %" for t, a in scores.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
