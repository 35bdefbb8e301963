"""Generated scenes as a vision model sees them, with their labels as class indices: the data of the vision
pretraining that runs before the three stages (`gmaivl_rt.train.vision_pretrain`, the demo's step 4).

Each picture is the scene's file (render.py's DICOM or NIfTI bytes) read by the converter's own reader
(`gmaivl_rt.medical.convert.to_medical_image`, the volume slice the questions are about) and preprocessed as the
model's image policy does (`preprocess_image`), so the pixels are the ones `data build` writes and training reads."""
from __future__ import annotations

import numpy as np
import torch

from gmaivl_rt.data.synth import render
from gmaivl_rt.data.synth.questions import QUESTION_TYPES, answer_pool, applicable, true_answer
from gmaivl_rt.data.synth.scenes import draw_scene
from gmaivl_rt.model.modeling import IGNORE_INDEX
from gmaivl_rt.model.preprocess import normalise, square_resized
from gmaivl_rt.processes import ordered_map

# a label that does not apply (no lesion: no side; a volume: no modality in its header, ...): the loss's ignore index
IGNORE = IGNORE_INDEX


RENDER_CHUNK = 64  # scans per task of the rendering pool (a few hundred ms of work; results come back in order)


def _render_chunk(task: tuple[int, int, int, int]) -> np.ndarray:
    """(stop - start, image_size, image_size, 3) uint8: scenes start..stop-1 of seed, read and resized as the model's
    preprocessing does; its torch half (`normalise`) runs in the parent, once per chunk, because torch's threads
    spin-wait between calls and would take the cores the workers render on."""
    seed, start, stop, image_size = task
    return np.stack([np.asarray(square_resized(render.scene_pixels(seed, index), image_size))
                     for index in range(start, stop)])


def scene_pictures(seed: int, count: int, image_size: int, progress: bool = False, workers: int = 1) -> torch.Tensor:
    """(count, 3, image_size, image_size) float32, CLIP-normalised: scenes 0..count-1 of `seed`, rendered and read
    in `workers` processes (`ordered_map`); the pictures are the same whatever the number."""
    from tqdm.auto import tqdm

    tasks = [(seed, start, min(start + RENDER_CHUNK, count), image_size) for start in range(0, count, RENDER_CHUNK)]
    pictures = []
    with tqdm(total=count, desc="rendering scans", unit="scan", disable=not progress) as bar:
        for chunk in ordered_map(_render_chunk, tasks, workers):
            pictures.append(normalise(chunk))
            bar.update(len(chunk))
    return torch.cat(pictures)


def scene_labels(seed: int, count: int) -> dict[str, torch.Tensor]:
    """{question type: (count,) int64}: each scene's answer as its index in `answer_pool(type)`, IGNORE where the
    type does not apply to the scene (`applicable`)."""
    scenes = [draw_scene(seed, index) for index in range(count)]
    return {qtype: torch.tensor([answer_pool(qtype).index(true_answer(s, qtype)) if qtype in applicable(s) else IGNORE
                                 for s in scenes], dtype=torch.int64) for qtype in QUESTION_TYPES}
