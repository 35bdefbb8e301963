"""The closed label space of the generated corpus and one scene per (seed, index).

A scene is what one file shows: its modality (and so its file kind), body region, plane (volumes), and its
findings (lesions: present or not, how many, on which side, small or large). Every label is drawn uniformly and
independently of the others, so no question about one label can be answered from the text of the question (or from
another label) better than chance. Each scene has its own RNG seeded by the hash of (seed, index): scene i is the
same whatever the count, and a benchmark drawn from another seed shares no scene with the corpus.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# File kinds, in the order scene indexes cycle through them (so modalities are balanced at any count).
KINDS = ("ct", "mr", "xray", "us", "nifti")
# The modality each kind's header names (DICOM Modality, or the manifest's modality for NIfTI), in words.
MODALITY_OF_KIND = {"ct": "CT", "mr": "MRI", "xray": "X-ray", "us": "ultrasound", "nifti": "MRI"}
MODALITIES = ("CT", "MRI", "X-ray", "ultrasound")
REGIONS = ("head", "chest", "abdomen", "pelvis")
PLANES = ("axial", "coronal", "sagittal")
SIDES = ("left", "right")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
# A department-style grouping (GMAI-MMBench's `department` column) follows the body region.
DEPARTMENT_OF_REGION = {"head": "neurology", "chest": "pulmonology", "abdomen": "gastroenterology",
                        "pelvis": "urology"}
# Made-up identities written into every DICOM header; the converter's de-identification must remove them.
# Names that are no English or medical word, so a match in text can only be a leak.
GIVEN_NAMES = ("Henrike", "Oswin", "Tamsyn", "Leopold", "Marisol", "Evander", "Rosalind", "Quillon")
FAMILY_NAMES = ("Quellmoor", "Brandvik", "Oxleyhart", "Vantrell", "Corwenna", "Dulmaris", "Pettigrove", "Amsel")
INSTITUTIONS = ("Saint Ebbwick Infirmary", "Harrowgate Vale Clinic", "Norrland Coast Hospital")


@dataclass(frozen=True)
class Scene:
    """One generated file's ground truth. kind: one of KINDS; plane: axial/coronal/sagittal for volume slices
    (None for projections and for 2D files whose header says axial through their orientation); count: 0 when no
    lesion; side/size: None when no lesion. identity: the made-up patient identity its header carries."""

    index: int
    kind: str
    region: str
    plane: str | None
    count: int
    side: str | None
    size: str | None
    identity: dict
    seed: int               # the scene's own pixel seed (texture, noise, exact positions)

    @property
    def modality(self) -> str:
        return MODALITY_OF_KIND[self.kind]

    @property
    def lesion(self) -> bool:
        return self.count > 0

    @property
    def department(self) -> str:
        return DEPARTMENT_OF_REGION[self.region]


def scene_rng(seed: int, index: int, salt: str = "scene") -> random.Random:
    """An RNG for one scene: independent of every other index and of the count asked for."""
    digest = hashlib.sha256(f"gmaivl-synth/{salt}/{seed}/{index}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def draw_scene(seed: int, index: int) -> Scene:
    """Scene `index` of the corpus seeded `seed` (deterministic)."""
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    rng = scene_rng(seed, index)
    kind = KINDS[index % len(KINDS)]
    region = rng.choice(REGIONS)
    plane = rng.choice(PLANES) if kind == "nifti" else None
    lesion = rng.random() < 0.5
    count = rng.choice(COUNTS) if lesion else 0
    side = rng.choice(SIDES) if lesion else None
    size = rng.choice(SIZES) if lesion else None
    identity = {
        "PatientName": f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES)}",
        "PatientID": f"PX{rng.randrange(10**6, 10**7)}",
        "PatientBirthDate": f"{rng.randrange(1930, 2005)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}",
        "InstitutionName": rng.choice(INSTITUTIONS),
        "ReferringPhysicianName": f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES)}",
        "AccessionNumber": f"AC{rng.randrange(10**7, 10**8)}",
        "StudyDate": f"{rng.randrange(2010, 2026)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}",
    }
    return Scene(index=index, kind=kind, region=region, plane=plane, count=count, side=side, size=size,
                 identity=identity, seed=rng.randrange(2**31))
