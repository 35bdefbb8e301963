"""A source folder and manifest with every task of the data converter, good and bad items, on the files pydicom
and nibabel ship and small synthetic images: what the data-build tests convert."""
from __future__ import annotations

import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import yaml
from dicom_files import DICOM_DIR
from nibabel.testing import data_path as NIFTI_DIR
from PIL import Image

LABELS = ["normal", "pneumonia", "effusion", "nodule"]


def write_csv(path, rows: list[dict]) -> None:
    """A CSV whose columns are every key of the rows, sorted."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def make_sources(root):
    """Source folder + manifest under `root` (a pathlib.Path; its images/ must not exist yet). Returns (manifest
    path, expectations: "bad" the (dataset, file) items the build must refuse, "anat_mask_slices" and
    "anat_axial_slices" of the 3D segmentation)."""
    img = root / "images"
    img.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(img / f"xray{i}.png")
    shutil.copy(os.path.join(DICOM_DIR, "CT_small.dcm"), img / "ct.dcm")
    shutil.copy(os.path.join(DICOM_DIR, "MR_small.dcm"), img / "mr.dcm")
    shutil.copy(os.path.join(DICOM_DIR, "badVR.dcm"), img / "badvr.dcm")
    data = open(os.path.join(DICOM_DIR, "CT_small.dcm"), "rb").read()
    (img / "truncated.dcm").write_bytes(data[: len(data) * 2 // 3])
    (img / "notes.dcm").write_text("patient notes, not an image\n")
    png = (img / "xray0.png").read_bytes()
    (img / "corrupt.png").write_bytes(png[: len(png) // 2])
    # 2D segmentation: a 64x48 image with a label-2 rectangle; a mask of the wrong size; an empty mask
    Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8)).save(img / "seg.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 30:50] = 2
    Image.fromarray(mask).save(img / "seg_mask.png")
    Image.fromarray(np.zeros((48, 60), np.uint8)).save(img / "seg_mask_small.png")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(img / "seg_mask_empty.png")
    mask[0:2, 0:2] = 7  # a value without a label name
    Image.fromarray(mask).save(img / "seg_mask_unnamed.png")
    # 3D segmentation on nibabel's anatomical.nii: label 1 in canonical axial slices 10..13 only
    anat = nib.load(os.path.join(NIFTI_DIR, "anatomical.nii"))
    canonical = nib.as_closest_canonical(anat)
    vol_mask = np.zeros(canonical.shape, np.uint8)
    vol_mask[10:20, 12:25, 10:14] = 1
    shutil.copy(os.path.join(NIFTI_DIR, "anatomical.nii"), img / "anat.nii")
    nib.save(nib.Nifti1Image(vol_mask, canonical.affine), img / "anat_mask.nii.gz")

    write_csv(root / "cls.csv", [{"image": f"xray{i}.png", "label": LABELS[i]} for i in range(4)]
              + [{"image": "ct.dcm", "label": "nodule"}, {"image": "corrupt.png", "label": "normal"},
                 {"image": "truncated.dcm", "label": "normal"}, {"image": "notes.dcm", "label": "normal"},
                 {"image": "badvr.dcm", "label": "normal"}])
    write_csv(root / "seg.csv", [{"image": "seg.png", "mask": "seg_mask.png"},
                                 {"image": "seg.png", "mask": "seg_mask_small.png"},
                                 {"image": "seg.png", "mask": "seg_mask_empty.png"},
                                 {"image": "seg.png", "mask": "seg_mask_unnamed.png"},
                                 {"image": "anat.nii", "mask": "anat_mask.nii.gz"}])
    with open(root / "det.jsonl", "w") as f:
        f.write(json.dumps({"image": "mr.dcm", "boxes": [{"label": "lesion", "box": [8, 16, 32, 48]},
                                                         {"label": "lesion", "box": [40, 0, 64, 10]}]}) + "\n")
        f.write(json.dumps({"image": "xray1.png", "boxes": []}) + "\n")
    with open(root / "rep.jsonl", "w") as f:
        f.write(json.dumps({"image": "ct.dcm", "report": "Small nodule in the left lower lobe.",
                            "impression": "Follow-up CT in 6 months."}) + "\n")
    with open(root / "vqa.jsonl", "w") as f:
        f.write(json.dumps({"image": "mr.dcm", "question": "Is the scan T1 or T2 weighted?", "answer": "T1",
                            "options": ["T1", "T2", "FLAIR"]}) + "\n")
        f.write(json.dumps({"image": "xray2.png", "question": "Which side is the marker on?",
                            "answer": "left"}) + "\n")
        # a multi-turn row (one dialogue about one image; options per turn) and one whose lists do not match
        f.write(json.dumps({"image": "ct.dcm", "question": ["Which organ is shown?", "Is there contrast?"],
                            "answer": ["lung", "no"], "options": [None, ["yes", "no"]]}) + "\n")
        f.write(json.dumps({"image": "xray1.png", "question": ["Which side?", "Any fracture?"],
                            "answer": ["left"]}) + "\n")
    manifest = {"datasets": [
        {"name": "chest_cls", "task": "classification", "image_root": "images", "annotations": "cls.csv",
         "labels": LABELS, "modality": "X-ray", "department": "pulmonology"},
        {"name": "organ_seg", "task": "segmentation", "image_root": "images", "annotations": "seg.csv",
         "labels": ["liver", "kidney"], "department": "radiology", "empty_slice_every": 5},
        {"name": "lesion_det", "task": "detection", "image_root": "images", "annotations": "det.jsonl",
         "labels": ["lesion"], "department": "oncology"},
        {"name": "ct_reports", "task": "report", "image_root": "images", "annotations": "rep.jsonl"},
        {"name": "small_vqa", "task": "vqa", "image_root": "images", "annotations": "vqa.jsonl"},
    ]}
    path = root / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    bad = {("chest_cls", "corrupt.png"), ("chest_cls", "truncated.dcm"), ("chest_cls", "notes.dcm"),
           ("chest_cls", "badvr.dcm"), ("organ_seg", "seg.png"), ("small_vqa", "xray1.png")}
    return path, {"bad": bad, "anat_mask_slices": 4, "anat_axial_slices": canonical.shape[2]}
