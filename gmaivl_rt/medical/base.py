"""What every medical image reader shares: the `MedicalImage` it returns, the `ImageSource` it may be handed in place
of a path, its errors, format detection by suffix, and the checks each reader runs before it decodes (pixel
limits, finite data, square pixels) with error text that never quotes header values or file paths."""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field

import numpy as np

from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.limits import DEFAULT_LIMITS

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PILLOW_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".bmp": "bmp"}
UNKNOWN_MODALITY = "medical image"  # modality_name() of a file that records no modality


class MedicalImageError(InputError):
    """A medical image (or mask) could not be read. The message names the file and the problem, never PHI."""


class MaskError(MedicalImageError):
    """A segmentation mask is unreadable or does not fit its image (size, shape, frame count)."""


@dataclass(frozen=True)
class MedicalImage:
    """One 2D picture taken from a medical image file.

    pixels: (H, W, 3) uint8 RGB, ready for display or CLIP preprocessing.
    mask:   (H, W) int32 label map aligned with `pixels` (0 = background) when a mask was given, else None.
    modality: DICOM modality code ("CT", "MR", "US", ...) or None when the format does not record one.
    body_part: lower-cased BodyPartExamined, or None.
    pixel_spacing: (row, column) spacing in mm of the returned pixels, or None when unknown.
    orientation: anatomical plane of the picture ("axial", "coronal", "sagittal", "oblique") or None.
    index / count: frame (DICOM, TIFF) or slice (NIfTI) index and how many there are.
    volume: the 4D volume index for NIfTI, else None.
    source_format: "dicom", "nifti", "png", "jpeg", "tiff" or "bmp".
    window: (centre, width) applied, in modality units, or None.
    window_name: how intensities were mapped: "file", "file VOI LUT", a CT window name, "user",
                 "percentile", "bit depth" or "none" (already 8-bit / colour).
    photometric: DICOM photometric interpretation of the source ("MONOCHROME2", "RGB", ...) or PIL mode.
    source_size: (height, width) of the frame / slice before square-pixel resampling (what annotations in
                 source pixel coordinates refer to).
    """

    pixels: np.ndarray
    modality: str | None = None
    body_part: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    orientation: str | None = None
    index: int = 0
    count: int = 1
    volume: int | None = None
    source_format: str = ""
    window: tuple[float, float] | None = None
    window_name: str = "none"
    photometric: str = ""
    source_size: tuple[int, int] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_color(self) -> bool:
        return not (np.array_equal(self.pixels[..., 0], self.pixels[..., 1])
                    and np.array_equal(self.pixels[..., 1], self.pixels[..., 2]))


@dataclass(frozen=True, eq=False)
class ImageSource:
    """An image given other than by a file name the reader may quote: what `gmaivl_rt.medical.convert` hands the
    readers in place of a path.

    label: how errors name it (its role, e.g. "image 1"). format: "dicom", "nifti" or "image" (Pillow).
    Exactly one of path (a file), data (its bytes) or obj (a pydicom Dataset, nibabel image or PIL image).
    limits: a `gmaivl_rt.limits.Limits` checked from headers before decoding, or None."""

    label: str
    format: str
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    obj: object = field(default=None, repr=False)
    limits: object = None

    def readable(self):
        """What pydicom / Pillow open: the path, or a fresh stream over the bytes."""
        return self.path if self.path is not None else io.BytesIO(self.data)


def source_label(path) -> str:
    """The file as errors name it: its base name only (directories may carry site or patient names), or the
    role of an `ImageSource`."""
    if isinstance(path, ImageSource):
        return path.label
    return os.path.basename(os.fspath(path)) or os.fspath(path)


def detect_format(path: str | os.PathLike) -> str:
    """'dicom' | 'nifti' | 'png' | 'jpeg' | 'tiff' | 'bmp', by suffix, else by the DICOM 'DICM' magic, else 'image'."""
    name = os.fspath(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    for suffix, fmt in PILLOW_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise MedicalImageError(f"{source_label(path)}: cannot open ({e.strerror})") from None
    return "dicom" if head[128:132] == b"DICM" else "image"


# Closed vocabularies: a DICOM header's Modality and BodyPartExamined are kept only when they are one of these terms
# (DICOM PS3.3 C.7.3.1.1.1 modality defined terms, with the common non-standard codes `modality_name` knows;
# PS3.16 Annex L body part defined terms), so no free text a header carries reaches a caption, preview or log.
DICOM_MODALITIES = frozenset("""
    AR ASMT AU BDUS BI BMD CD CF CP CR CS CT DD DF DG DM DOC DR DS DX EC ECG EEG EMG EOG EPS ES FA FID FS GM HC HD IO
    IOL IVOCT IVUS KER KO LEN LP LS MA MG MR MRI MS M3D NM OAM OCT OP OPM OPR OPT OPTBSV OPTENF OPV OSS OT PET PLAN
    POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SC SEG SM SMR SR
    SRF ST STAIN TEXTUREMAP TG US VA VF XA XAPROTOCOL XC XR X-RAY""".split())
BODY_PARTS = frozenset("""
    ABDOMEN ABDOMENPELVIS ACJOINT ADRENAL AMNIOTICFLUID ANKLE ANUS AORTA APPENDIX ARM AXILLA BACK BILEDUCT BLADDER
    BRAIN BREAST BRONCHUS BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS
    CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CORONARYARTERY CSPINE CTSPINE DUODENUM EAR ELBOW ESOPHAGUS EXTREMITY
    EYE EYELID FACE FEMUR FINGER FOOT FOREARM GALLBLADDER HAND HEAD HEADNECK HEART HIP HUMERUS IAC ILEUM ILIUM JAW
    JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LSPINE LSSPINE LUNG MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST
    NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY PANCREAS PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RECTUM
    RIB SCALP SCAPULA SCLERA SCROTUM SELLA SHOULDER SKULL SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR THIGH
    THORAX THUMB THYROID TIBIA TLSPINE TOE TONGUE TRACHEA TSPINE ULNA URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY
    WRIST ZYGOMA""".split())


def modality_code(value) -> str | None:
    """A header's Modality as its upper-case code when it is one of DICOM_MODALITIES, else None."""
    code = str(value or "").strip().upper()
    return code if code in DICOM_MODALITIES else None


def body_part_term(value) -> str | None:
    """A header's BodyPartExamined, lower case without spaces, when it is one of BODY_PARTS, else None."""
    term = str(value or "").replace(" ", "").strip().upper()
    return term.lower() if term in BODY_PARTS else None


def modality_name(code: str | None) -> str:
    """Human name of a DICOM modality code, for text ("MR" -> "MRI"); unknown codes pass through; no code at all
    gives UNKNOWN_MODALITY."""
    names = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "US": "ultrasound", "CR": "X-ray", "DX": "X-ray",
             "DR": "X-ray", "XR": "X-ray", "X-RAY": "X-ray", "MG": "mammography", "NM": "nuclear medicine",
             "PT": "PET", "PET": "PET", "XA": "angiography", "RF": "fluoroscopy", "OT": "secondary capture",
             "SC": "secondary capture", "RTDOSE": "radiotherapy dose map", "SM": "pathology slide",
             "OP": "fundus photograph", "OCT": "OCT", "ES": "endoscopy", "SEG": "segmentation"}
    if not code:
        return UNKNOWN_MODALITY
    return names.get(code.upper(), code)


_UID_OR_NUMBER = re.compile(r"\d[\d.]{5,}")
# Quoted text and file paths in library messages may carry header values or names (patients, sites).
_QUOTED_OR_PATH = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'|(?:[A-Za-z]:)?[\\/]\S+")


def safe_reason(error: BaseException) -> str:
    """An exception's class and message with quoted text, paths and long numbers / UIDs masked (messages may
    quote header values or file names)."""
    text = " ".join(str(error).split())[:160]
    text = _UID_OR_NUMBER.sub("#", _QUOTED_OR_PATH.sub("…", text))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def source_limits(path):
    """The limits a read obeys: the request's (to_medical_image) or, for a plain path, the defaults, so no reader
    (the data builder's included) decodes a decompression bomb."""
    if isinstance(path, ImageSource):
        return path.limits
    return DEFAULT_LIMITS


def check_pixels(path, height: int, width: int, what: str = "picture") -> None:
    """Refuse a picture over limits.max_image_pixels (from its header, before decoding)."""
    limits = source_limits(path)
    if limits is not None and height * width > limits.max_image_pixels:
        raise LimitError(f"{source_label(path)}: {width}x{height} = {height * width} pixels per {what} is over the "
                         f"limit of {limits.max_image_pixels}")


def check_finite(values: np.ndarray, label: str) -> None:
    """Refuse pixel data with no finite value (all NaN / inf would otherwise become a blank picture)."""
    if values.dtype.kind in "fc" and not np.isfinite(values).any():
        raise MedicalImageError(f"{label}: pixel data has no finite value (all NaN or infinite)")


def square_pixels(plane2d: np.ndarray, spacing, nearest: bool, path=None) -> tuple[np.ndarray,
                                                                                   tuple[float, float] | None]:
    """Resample a (H, W) float/int plane so both pixel sides equal the finer spacing. Returns (plane, spacing):
    float32 (bilinear) or int32 (`nearest`, for label masks). path: the image, whose pixel limit (if any) the
    resampled size must keep (a header's spacing sets it)."""
    if spacing is None:
        return plane2d, None
    row, col = float(spacing[0]), float(spacing[1])
    if row <= 0 or col <= 0 or abs(row - col) <= 1e-3 * max(row, col):
        return plane2d, (row, col)
    from PIL import Image

    target = min(row, col)
    h, w = plane2d.shape
    new_h, new_w = max(1, round(h * row / target)), max(1, round(w * col / target))
    if path is not None:
        check_pixels(path, new_h, new_w, "picture resampled to square pixels")
    if nearest:
        img = Image.fromarray(plane2d.astype(np.int32), mode="I").resize((new_w, new_h), Image.NEAREST)
        return np.asarray(img).astype(np.int32), (target, target)
    img = Image.fromarray(plane2d.astype(np.float32), mode="F").resize((new_w, new_h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32), (target, target)
