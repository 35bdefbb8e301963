"""Scenes -> pixels -> file bytes: a tissue map per body region (or a 3D phantom for volumes), turned into each
modality's values (CT Hounsfield units, T1/T2-like MR signal, a blurred radiograph, an ultrasound fan with
speckle), written as real DICOM (pydicom) or NIfTI (nibabel) with the modality and geometry in the header.

Conventions: axial DICOM images have ImageOrientationPatient [1,0,0, 0,1,0] (LPS), so columns run toward the
patient's left and a lesion on the patient's left lies in the image's right half; radiographs are frontal (PA) with
the same left-right display; the NIfTI affine is diagonal RAS+ (x toward the patient's right). Every random choice
comes from the scene's own seed, so a file's bytes depend only on (corpus seed, index).
"""
from __future__ import annotations

import io
import math

import numpy as np

from gmaivl_rt.data.synth.scenes import Scene, draw_scene

SIZE = 128          # 2D pictures are SIZE x SIZE pixels
VOLUME = 48         # volumes are VOLUME^3 voxels
PIXEL_MM = 2.5      # pixel spacing / voxel size written in the headers
# Lesions are sized and valued so that a ViT trained from scratch on a few hundred scans can find them: wider than a
# fifth of a 28-pixel patch, and, as the converter displays each file (CT through its header's window, radiographs by
# bit depth, ultrasound as stored, MR and volumes by percentiles), at a grey level of their own: brighter than every
# soft tissue and organ, darker than bone, so no anatomy (spine, hip bones, skull, ventricles, bladder) looks like one.
LESION_RADIUS = {"small": (5.0, 6.0), "large": (7.5, 9.0)}     # in pixels at SIZE
# Tissue codes of the maps (FAT: the volumes' subcutaneous layer).
AIR, SOFT, ORGAN, BONE, LUNG, FLUID, LESION, FAT = range(8)
# CT: Hounsfield units per tissue; the lesion (an enhancing focus) per region, so that it lies inside the region's
# window, well above soft tissue and organ and well below bone (which the window saturates); window (centre, width)
# written into the header per region (a wide brain window for the head, soft-tissue windows for the rest).
CT_HU = {AIR: -1000.0, SOFT: 30.0, ORGAN: 60.0, BONE: 800.0, LUNG: -850.0, FLUID: 5.0, FAT: -100.0}
CT_LESION_HU = {"head": 100.0, "chest": 150.0, "abdomen": 150.0, "pelvis": 150.0}
CT_WINDOW = {"head": (40.0, 200.0), "chest": (40.0, 400.0), "abdomen": (40.0, 400.0), "pelvis": (40.0, 400.0)}
# MR signal (arbitrary 12-bit units) per tissue for T1-like and T2-like contrast (fluid dark on T1, bright on T2; fat
# bright on both, as on fast spin echo: the volumes' fat layer puts the percentile window's top above the lesions).
MR_SIGNAL = {"T1": {AIR: 20.0, SOFT: 1400.0, ORGAN: 1000.0, BONE: 200.0, LUNG: 90.0, FLUID: 300.0, LESION: 2600.0,
                    FAT: 3500.0},
             "T2": {AIR: 20.0, SOFT: 900.0, ORGAN: 650.0, BONE: 150.0, LUNG: 80.0, FLUID: 2200.0, LESION: 1700.0,
                    FAT: 3700.0}}
# Radiograph attenuation per tissue (projection: bone brightest, lungs dark, an opacity between organ and bone).
XRAY_ATTENUATION = {AIR: 0.0, SOFT: 0.35, ORGAN: 0.45, BONE: 1.2, LUNG: 0.08, FLUID: 0.4, LESION: 0.7, FAT: 0.3}
# Ultrasound echogenicity per tissue (fluid hypoechoic; bone the strongest reflector, saturating; lesions
# hyperechoic, between organ and bone).
US_ECHO = {AIR: 0.02, SOFT: 0.45, ORGAN: 0.6, BONE: 1.6, LUNG: 0.15, FLUID: 0.05, LESION: 1.0, FAT: 0.5}


# ------------------------------------------------------------------------------------------------ tissue maps
def _ellipse(shape, cy, cx, ry, rx) -> np.ndarray:
    """(shape) bool: the pixels whose centre lies in the ellipse (centre cy, cx; semi-axes ry, rx)."""
    window, mask = _ellipse_window(shape, cy, cx, ry, rx)
    full = np.zeros(shape, bool)
    full[window] = mask
    return full


def _ellipse_window(shape, cy, cx, ry, rx) -> tuple[tuple[slice, slice], np.ndarray]:
    """(the ellipse's bounding box within `shape`, a pixel wider on each side, as (rows, columns) slices; the
    ellipse's mask inside that box): what a small lesion's disc needs, computed on the box alone (a lesion is placed
    by trial, so this test runs dozens of times a scan)."""
    y0 = min(shape[0], max(0, math.floor(cy - ry) - 1))  # clamped both ways: an ellipse off the picture gets an
    x0 = min(shape[1], max(0, math.floor(cx - rx) - 1))  # empty box, never a negative (wrapping) slice end
    y1, x1 = max(y0, min(shape[0], math.ceil(cy + ry) + 2)), max(x0, min(shape[1], math.ceil(cx + rx) + 2))
    yy, xx = np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :]  # a column and a row, broadcast
    return (slice(y0, y1), slice(x0, x1)), ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def region_map(region: str, rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE) uint8 tissue codes of one body region's cross-section (or frontal view), slightly jittered."""
    s, c = SIZE, SIZE / 2
    j = lambda v: v * float(rng.uniform(0.93, 1.07))  # noqa: E731 - a small per-scene size jitter
    tissue = np.full((s, s), AIR, np.uint8)
    if region == "head":
        r = j(55)
        tissue[_ellipse((s, s), c, c, r * 1.1, r)] = BONE
        tissue[_ellipse((s, s), c, c, r * 1.1 - 5, r - 5)] = ORGAN
        for dx in (-7, 7):  # the two lateral ventricles
            tissue[_ellipse((s, s), c - 4, c + dx, 11, 4)] = FLUID
    elif region == "chest":
        ry, rx = j(40), j(58)
        tissue[_ellipse((s, s), c, c, ry, rx)] = SOFT
        for dx in (-27, 27):
            tissue[_ellipse((s, s), c - 2, c + dx, ry - 10, 21)] = LUNG
        tissue[_ellipse((s, s), c + 4, c - 4, 14, 16)] = ORGAN          # heart
        tissue[_ellipse((s, s), c + ry - 9, c, 6, 6)] = BONE           # spine
    elif region == "abdomen":
        ry, rx = j(44), j(54)
        tissue[_ellipse((s, s), c, c, ry, rx)] = SOFT
        tissue[_ellipse((s, s), c - 6, c - 22, 24, 24)] = ORGAN        # liver (patient's right = image left)
        for dx in (-22, 22):
            tissue[_ellipse((s, s), c + 20, c + dx, 9, 6)] = ORGAN     # kidneys
        tissue[_ellipse((s, s), c + ry - 10, c, 7, 7)] = BONE
    elif region == "pelvis":
        ry, rx = j(44), j(58)
        tissue[_ellipse((s, s), c, c, ry, rx)] = SOFT
        for dx in (-36, 36):
            tissue[_ellipse((s, s), c + 4, c + dx, 16, 9)] = BONE      # hip bones
        tissue[_ellipse((s, s), c - 6, c, 14, 17)] = FLUID             # bladder
    else:
        raise ValueError(f"unknown body region {region!r}")
    return tissue


CELL_JITTER = 0.2  # a lesion's centre lies within this fraction of a cell from the cell's centre
GRID = 4  # lesions lie in different cells of a GRID x GRID grid: the compact ViT's patches (112 px / 28 px)


def place_lesions(body: np.ndarray, scene: Scene, rng: np.random.Generator, scale: float = 1.0,
                  left_is_high_column: bool = True) -> list[tuple[float, float, float]]:
    """Centres and radii [(y, x, r)] of the scene's lesions: inside `body` (bool, (H, W)), all in the half of the
    patient's `scene.side`, each in its own cell of a GRID x GRID grid over the picture (so a lesion never spans two
    of the compact ViT's patches and no two share one: the count is the number of patches that show a lesion).
    left_is_high_column: the patient's left is the image's right (DICOM LPS / radiograph display); False for a
    RAS+ volume's x axis."""
    if not scene.lesion:
        return []
    h, w = body.shape
    ch, cw = h / GRID, w / GRID
    lo, hi = LESION_RADIUS[scene.size]
    on_high = (scene.side == "left") == left_is_high_column
    columns = range(GRID // 2, GRID) if on_high else range(GRID // 2)
    cells = [(row, col) for row in range(GRID) for col in columns]
    for _attempt in range(200):  # a random cell per lesion, a random centre in it; started over on a miss
        placed: list[tuple[float, float, float]] = []
        for index in rng.permutation(len(cells)):
            if len(placed) == scene.count:
                break
            row, col = cells[index]
            for _try in range(30):
                r = float(rng.uniform(lo, hi)) * scale
                # near the cell's centre (the disc inside the cell, alike in every patch that shows one); where the
                # anatomy leaves no room there, anywhere with at least half a radius inside the cell
                spread = CELL_JITTER if _try < 20 else 0.5 - (r / 2 + 1) / min(ch, cw)
                y = float((row + 0.5 + rng.uniform(-spread, spread)) * ch)
                x = float((col + 0.5 + rng.uniform(-spread, spread)) * cw)
                window, disc = _ellipse_window(body.shape, y, x, r, r)
                if body[window][disc].all():
                    placed.append((y, x, r))
                    break
        if len(placed) == scene.count:
            return placed
    # never seen with these sizes (tests draw thousands of scenes); a scene must not silently change its labels
    raise RuntimeError(f"scene {scene.index}: could not place {scene.count} {scene.size} lesions")


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge-padded), float32."""
    radius = max(1, int(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(image, np.float32)
    for axis in range(out.ndim):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(out.ndim)], mode="edge")
        n = out.shape[axis]
        # the kernel's taps as shifted slices of the whole array (float64, as np.convolve sums), not one
        # np.convolve per row: the same blur, 3x faster
        total = np.zeros(out.shape, np.float64)
        for tap, weight in enumerate(kernel[::-1]):
            total += weight * np.take(padded, np.arange(tap, tap + n), axis=axis)
        out = total.astype(np.float32)
    return out


def _values(tissue: np.ndarray, table: dict) -> np.ndarray:
    lut = np.zeros(max(table) + 1, np.float32)
    for code, value in table.items():
        lut[code] = value
    return lut[tissue]


def scene_tissue(scene: Scene, rng: np.random.Generator, visible: np.ndarray | None = None) -> np.ndarray:
    """The 2D tissue map of a DICOM scene with its lesions drawn in (inside `visible`, when given)."""
    tissue = region_map(scene.region, rng)
    body = (tissue != AIR) & (tissue != BONE)
    if visible is not None:
        body &= visible
    for y, x, r in place_lesions(body, scene, rng):
        window, disc = _ellipse_window(tissue.shape, y, x, r, r)
        tissue[window][disc] = LESION
    return tissue


# ------------------------------------------------------------------------------------------------ modalities
def render_ct(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Stored CT values (uint16, HU + 1024: RescaleSlope 1, RescaleIntercept -1024)."""
    hu = _values(scene_tissue(scene, rng), {**CT_HU, LESION: CT_LESION_HU[scene.region]})
    hu += rng.normal(0, 12, (SIZE, SIZE)).astype(np.float32)
    return np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)


def render_mr(scene: Scene, rng: np.random.Generator, contrast: str) -> np.ndarray:
    """MR signal (uint16) with T1- or T2-like contrast, smooth bias field and Rician-like noise."""
    signal = _blur(_values(scene_tissue(scene, rng), MR_SIGNAL[contrast]), 0.8)
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    bias = 1.0 + 0.15 * np.sin(np.pi * (yy + float(rng.uniform(0, 1)))) * np.cos(np.pi * xx)
    noise = rng.normal(0, 30, (2, SIZE, SIZE))
    magnitude = np.hypot(signal * bias + noise[0], noise[1])
    return np.clip(np.rint(magnitude), 0, 4095).astype(np.uint16)


def render_xray(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A frontal radiograph (uint16, 12-bit): the tissue map's attenuation blurred like a projection, a
    soft vertical exposure gradient and fine quantum noise."""
    attenuation = _blur(_values(scene_tissue(scene, rng), XRAY_ATTENUATION), 1.6)
    gradient = np.linspace(0.9, 1.1, SIZE, dtype=np.float32)[:, None]
    image = attenuation * gradient + rng.normal(0, 0.015, (SIZE, SIZE)).astype(np.float32)
    return np.clip(np.rint(image * 3000 + 200), 0, 4095).astype(np.uint16)


def ultrasound_fan() -> tuple[np.ndarray, np.ndarray]:
    """(the sector an ultrasound frame shows, bool (SIZE, SIZE); each pixel's depth from the probe's apex above the
    top edge, float32)."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    apex_y, apex_x = -10.0, SIZE / 2
    depth = np.hypot(yy - apex_y, xx - apex_x)
    angle = np.degrees(np.arctan2(xx - apex_x, yy - apex_y))
    return (np.abs(angle) <= 50) & (depth >= 16) & (depth <= SIZE + 8), depth


def render_us(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A B-mode ultrasound frame (uint8): echogenicity inside a sector (fan) from an apex at the top, multiplied
    by Rayleigh speckle, with depth attenuation; black outside the fan."""
    fan, depth = ultrasound_fan()
    echo = _blur(_values(scene_tissue(scene, rng, visible=fan), US_ECHO), 1.0)  # lesions only where they show
    # Speckle is spatially correlated (a few pixels across), not independent per pixel.
    speckle = _blur(rng.rayleigh(0.8, (SIZE, SIZE)), 0.9)
    speckle *= 1.0 / float(speckle.mean())
    image = (0.08 + echo) * speckle * (1.15 - 0.4 * depth / SIZE)
    image = np.where(fan, image, 0.0)
    return np.clip(np.rint(image * 190), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ volumes
def render_volume(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(X, Y, Z) int16 MR-like volume in RAS+ and the index of the slice along `scene.plane` that shows every
    lesion (`volume_tissue` with T1- or T2-like signal and noise)."""
    tissue, index = volume_tissue(scene, rng)
    contrast = "T2" if rng.random() < 0.5 else "T1"
    volume = _values(tissue, MR_SIGNAL[contrast]) + rng.normal(0, 25, tissue.shape).astype(np.float32)
    return np.clip(np.rint(volume), 0, 4095).astype(np.int16), index


def volume_tissue(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(X, Y, Z) uint8 tissue codes of a volume scene in RAS+ and the index of its slice along `scene.plane`. The
    body is an ellipsoid wider left-right than front-back and taller than wide, under a layer of fat, with a spine
    at the back, so the three planes look different."""
    n = VOLUME
    x, y, z = np.mgrid[:n, :n, :n].astype(np.float32)
    c, semi, index = _volume_geometry(scene, rng)
    body = ((x - c) / semi[0]) ** 2 + ((y - c) / semi[1]) ** 2 + ((z - c) / semi[2]) ** 2 <= 1.0
    spine = ((x - c) ** 2 + (y - (c - semi[1] + 4)) ** 2 <= 9.0) & body
    outer = semi + 2.0  # a 2-voxel subcutaneous fat layer around the body
    tissue = np.where(((x - c) / outer[0]) ** 2 + ((y - c) / outer[1]) ** 2 + ((z - c) / outer[2]) ** 2 <= 1.0,
                      FAT, AIR).astype(np.uint8)
    tissue[body] = SOFT
    tissue[((x - c) / 9) ** 2 + ((y - c - 2) / 6) ** 2 + ((z - c) / 12) ** 2 <= 1.0] = ORGAN
    tissue[spine] = BONE
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[scene.plane]
    if scene.lesion:
        slab = np.take(tissue, index, axis=axis)
        inside = (slab == SOFT) | (slab == ORGAN)
        # slab axes: axial (x, y), coronal (x, z), sagittal (y, z); sides live on x (RAS+: high x = patient right)
        # place_lesions takes (rows, columns) with sides on the columns: the slab transposed puts x (the first
        # free axis of an axial or coronal slab; RAS+: high x = patient's right) on the columns.
        along_x = scene.plane != "sagittal"
        placed = place_lesions(inside.T, scene if along_x else _without_side(scene), rng, scale=0.36,
                               left_is_high_column=not along_x)
        free = [a for a in range(3) if a != axis]
        for row, column, r in placed:
            centre = [0.0, 0.0, 0.0]
            centre[free[0]], centre[free[1]], centre[axis] = column, row, float(index)
            ball = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= r ** 2
            tissue[ball & body & ~spine & (tissue != FAT)] = LESION
    return tissue, index


def _volume_geometry(scene: Scene, rng: np.random.Generator) -> tuple[float, np.ndarray, int]:
    """(the volume's centre, the body's semi-axes (x, y, z), the slice index along scene.plane): the first draw of
    a volume scene's RNG."""
    c = (VOLUME - 1) / 2
    semi = np.array([20.0, 14.0, 22.0]) * float(rng.uniform(0.94, 1.06))
    index = int(round(c))
    if scene.lesion and scene.plane == "sagittal":  # the slice itself lies on the lesion's side
        index = int(round(c + (-1 if scene.side == "left" else 1) * semi[0] * 0.45))
    return c, semi, index


def _without_side(scene: Scene) -> Scene:
    """A sagittal slice lies on one side already: lesions go anywhere in it (either half of the slab)."""
    import dataclasses

    return dataclasses.replace(scene, side="left" if scene.seed % 2 else "right")


# ------------------------------------------------------------------------------------------------ files
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "CR": "1.2.840.10008.5.1.4.1.1.1",
             "DX": "1.2.840.10008.5.1.4.1.1.1.1", "US": "1.2.840.10008.5.1.4.1.1.6.1"}
BODY_PART = {"head": "HEAD", "chest": "CHEST", "abdomen": "ABDOMEN", "pelvis": "PELVIS"}


def render_file(scene: Scene) -> tuple[str, bytes]:
    """(file suffix, file bytes) of a scene: '.dcm' for the 2D kinds, '.nii' for volumes."""
    rng = np.random.default_rng(scene.seed)
    if scene.kind == "nifti":
        import nibabel as nib

        volume, _ = render_volume(scene, rng)
        affine = np.diag([PIXEL_MM, PIXEL_MM, PIXEL_MM, 1.0])
        image = nib.Nifti1Image(volume, affine)
        image.header.set_xyzt_units("mm")
        return ".nii", image.to_bytes()
    if scene.kind == "ct":
        pixels, code = render_ct(scene, rng), "CT"
    elif scene.kind == "mr":
        contrast = "T2" if rng.random() < 0.5 else "T1"
        pixels, code = render_mr(scene, rng, contrast), "MR"
    elif scene.kind == "xray":
        pixels, code = render_xray(scene, rng), ("CR" if rng.random() < 0.5 else "DX")
    elif scene.kind == "us":
        pixels, code = render_us(scene, rng), "US"
    else:
        raise ValueError(f"unknown scene kind {scene.kind!r}")
    return ".dcm", dicom_bytes(scene, pixels, code)


def tissue_map(scene: Scene) -> np.ndarray:
    """The tissue codes behind a scene's file, drawn with the RNG in the state its rendering draws them in:
    (SIZE, SIZE) uint8 for the 2D kinds (the picture's own rows and columns), (VOLUME,) * 3 for volumes (RAS+)."""
    rng = np.random.default_rng(scene.seed)
    if scene.kind == "nifti":
        return volume_tissue(scene, rng)[0]
    if scene.kind == "mr":
        rng.random()  # the contrast, drawn before the map
    return scene_tissue(scene, rng, visible=ultrasound_fan()[0] if scene.kind == "us" else None)


def slice_index(scene: Scene) -> int:
    """The volume slice (along scene.plane) that the scene's questions are about (without rendering the volume)."""
    return _volume_geometry(scene, np.random.default_rng(scene.seed))[2]


def dicom_bytes(scene: Scene, pixels: np.ndarray, code: str) -> bytes:
    """A DICOM Part 10 file (explicit VR little endian) of `pixels` (H, W) uint8/uint16, modality `code`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    key = f"{scene.seed}/{scene.index}"
    sop_uid = generate_uid(entropy_srcs=[key, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[code]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS[code], sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[key, "series"])
    for keyword, value in scene.identity.items():
        setattr(ds, keyword, value)
    ds.Modality = code
    ds.BodyPartExamined = BODY_PART[scene.region]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, (8 if bits == 8 else 12), \
        (7 if bits == 8 else 11), 0
    if code in ("CT", "MR"):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-SIZE * PIXEL_MM / 2, -SIZE * PIXEL_MM / 2, 0]
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.SliceThickness = PIXEL_MM
    elif code in ("CR", "DX"):
        ds.ImagerPixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.ViewPosition = "PA"
    if code == "CT":
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.WindowCenter, ds.WindowWidth = [str(int(v)) for v in CT_WINDOW[scene.region]]
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def scene_pixels(seed: int, index: int):
    """Scene `index` of `seed` as the converter reads it: (H, W, 3) uint8 (its file rendered, then read by
    `to_medical_image`; a volume at the slice the questions are about). Numpy only, no torch (the vision
    pretraining runs it in forked workers)."""
    from gmaivl_rt.medical.convert import to_medical_image

    scene = draw_scene(seed, index)
    _, data = render_file(scene)
    where = {"slice_index": slice_index(scene), "plane": scene.plane} if scene.kind == "nifti" else {}
    return to_medical_image(data, role=f"generated scan {index}", **where).pixels
