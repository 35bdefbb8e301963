"""DICOM (pydicom 3) -> `MedicalImage`: modality LUT (rescale slope/intercept or LUT), then the file's VOI LUT or
its first window (PS3.3 C.11.2.1.2 LINEAR / LINEAR_EXACT / SIGMOID); CT files without a window get a named CT window
picked from the body part; other greyscale files a 0.5-99.5 percentile stretch. MONOCHROME1 is inverted. Colour
data (RGB, YBR_* - converted to RGB by pydicom's decoder path) and PALETTE COLOR (`apply_color_lut`) are supported.
Enhanced multi-frame objects take spacing, orientation, rescale and window from their (per-frame or shared)
functional groups. Compressed transfer syntaxes decode when a decoder plugin is installed; otherwise the error names
the transfer syntax and the packages that decode it. Only whitelisted, non-identifying attributes are read."""
from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np

from gmaivl_rt.medical.base import (ImageSource, MedicalImage, MedicalImageError, body_part_term, check_finite,
                                    check_pixels, modality_code, safe_reason, source_label, square_pixels)
from gmaivl_rt.medical.windowing import (CT_WINDOWS, STRETCHES, apply_window, ct_window_name, grey_unit,
                                         parse_window, percentile_unit, to_uint8)

# Compressed DICOM: the [dicom-codecs] extra's decoders first (pylibjpeg-libjpeg / -openjpeg / -rle, pyjpegls,
# python-gdcm), then pydicom's own order among whatever else is installed (Pillow).
DICOM_PLUGIN_PREFERENCE = ("pylibjpeg", "pyjpegls", "gdcm")


@contextlib.contextmanager
def quiet_pydicom():
    """Silence pydicom's warnings and its logger for the block: both quote raw header values (UIDs, names)."""
    pydicom_logger = logging.getLogger("pydicom")
    was_disabled, was_propagating = pydicom_logger.disabled, pydicom_logger.propagate
    # disabled silences pydicom's own logger; its children (pydicom.pixels.decoders.base logs decode failures)
    # still propagate to the root's handlers unless the parent stops propagation.
    pydicom_logger.disabled, pydicom_logger.propagate = True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.disabled, pydicom_logger.propagate = was_disabled, was_propagating


def _is_decoder_panic(error: BaseException) -> bool:
    """A Rust decoder's panic on damaged data (pyo3's PanicException, e.g. pylibjpeg-rle): a BaseException, so
    `except Exception` misses it, but it only means the data cannot be decoded."""
    return type(error).__name__ == "PanicException"


def _plane_from_iop(iop) -> str | None:
    try:
        v = np.asarray([float(x) for x in iop], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if v.shape != (6,):
        return None
    normal = np.abs(np.cross(v[:3], v[3:]))
    if normal.max() < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(normal.argmax())]


def read_dataset(path, stop_before_pixels: bool = False):
    """A DICOM file (a path or an `ImageSource`) -> its pydicom Dataset, pixel data undecoded (with
    stop_before_pixels, not even read: the header alone). Raises MedicalImageError for anything but an image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    given = path.obj if isinstance(path, ImageSource) else None
    readable = path.readable if isinstance(path, ImageSource) else lambda: path
    try:
        with quiet_pydicom():
            try:
                ds = given if given is not None else pydicom.dcmread(readable(), stop_before_pixels=stop_before_pixels)
            except InvalidDicomError:
                # No preamble: legal for old files, so retry leniently but demand an image.
                ds = pydicom.dcmread(readable(), force=True, stop_before_pixels=stop_before_pixels)
                if ("PixelData" not in ds and not stop_before_pixels) or "Rows" not in ds:
                    raise MedicalImageError(f"{source_label(path)}: not a DICOM file (no 'DICM' marker "
                                            "and no image attributes)") from None
    except MedicalImageError:
        raise
    except Exception as e:  # pydicom raises many types on damaged files
        raise MedicalImageError(f"{source_label(path)}: unreadable DICOM ({safe_reason(e)})") from None
    if "PixelData" not in ds and not stop_before_pixels:
        raise MedicalImageError(f"{source_label(path)}: DICOM file has no pixel data (not an image)")
    return ds


def _geometry(ds) -> tuple[int, int, str, int, int]:
    """(frames, samples per pixel, photometric interpretation, rows, columns) of a dataset's image."""
    return (int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1)),
            str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper(), int(ds.Rows), int(ds.Columns))


def dicom_decoded_pixels(path) -> int:
    """Pixel values `DicomSource(path).image(...)` decodes, from the header alone (the pixel data is not read):
    one frame's rows x columns (one frame is decoded per picture, whatever NumberOfFrames says), three times that
    for colour (samples per pixel 3, or a palette). Raises MedicalImageError / LimitError as the reader would."""
    ds = read_dataset(path, stop_before_pixels=True)
    try:
        with quiet_pydicom():
            count, samples, photometric, rows, columns = _geometry(ds)
    except Exception as e:
        raise MedicalImageError(f"{source_label(path)}: bad DICOM image attributes ({safe_reason(e)})") from None
    if count < 1 or rows < 0 or columns < 0:
        raise MedicalImageError(f"{source_label(path)}: bad DICOM image attributes (frames, rows or columns)")
    check_pixels(path, rows, columns, "frame")
    colour = samples > 1 or photometric == "PALETTE COLOR"
    return rows * columns * (3 if colour else 1)


class DicomSource:
    """One DICOM file (a path or an `ImageSource`) opened for reading, its pixel data not yet decoded: `count`
    frames of `rows` x `columns`, `image(index)` -> MedicalImage. window: as `read_medical_image` takes it."""

    def __init__(self, path, window):
        self.path = path
        self.window, self.window_name = parse_window(window, path)
        self.ds = read_dataset(path)
        self._check_decoder()
        with quiet_pydicom():
            self._read_attributes()
        self.frames: np.ndarray | None = None  # all decoded frames, when iterating a multi-frame file

    def _read_attributes(self):
        ds, path = self.ds, self.path
        try:
            self.count, self.samples, self.photometric, self.rows, self.columns = _geometry(ds)
            spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or \
                _functional_group(ds, "PixelMeasuresSequence", "PixelSpacing")
            self.spacing = (round(float(spacing[0]), 6), round(float(spacing[1]), 6)) \
                if spacing and len(spacing) >= 2 else None
        except Exception as e:
            raise MedicalImageError(f"{source_label(path)}: bad DICOM image attributes ({safe_reason(e)})") from None
        if self.count < 1:
            raise MedicalImageError(f"{source_label(path)}: DICOM NumberOfFrames is {self.count}")
        check_pixels(path, self.rows, self.columns, "frame")
        # Closed vocabularies only: free text in these headers never leaves the reader.
        self.modality = modality_code(ds.get("Modality"))
        self.body_part = body_part_term(ds.get("BodyPartExamined"))
        iop = ds.get("ImageOrientationPatient") or \
            _functional_group(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
        self.orientation = _plane_from_iop(iop) if iop else None

    def _check_decoder(self):
        """Refuse a compressed transfer syntax nothing installed decodes; choose the plugins to try, in order."""
        from pydicom.pixels import get_decoder

        meta = getattr(self.ds, "file_meta", None)
        uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
        self._syntax, self._plugins = uid, [""]  # "": pydicom picks among every available plugin
        try:
            compressed = uid is not None and uid.is_compressed
        except Exception:  # a damaged or private transfer syntax UID
            compressed = False
        if not compressed:
            return
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            raise MedicalImageError(f"{source_label(self.path)}: transfer syntax '{uid.name}' ({uid}) has no pixel "
                                    "data decoder in pydicom") from None
        if not decoder.is_available:
            raise MedicalImageError(
                f"{source_label(self.path)}: transfer syntax '{uid.name}' ({uid}) needs a decoder package; install one "
                f"of: {'; '.join(decoder.missing_dependencies)}")
        preferred = [p for p in DICOM_PLUGIN_PREFERENCE if p in decoder.available_plugins]
        self._plugins = preferred + [""]

    def default_index(self) -> int:
        return 0

    def _decode(self, index: int | None) -> np.ndarray:
        """Stored values of frame `index` (None: all frames). Compressed data tries the dedicated codec packages
        (DICOM_PLUGIN_PREFERENCE) before pydicom's own choice among the rest (Pillow's JPEG and J2K decoders
        fail on 12-bit JPEG Extended and some J2K files the dedicated ones read)."""
        error = None
        for plugin in self._plugins:
            try:
                with quiet_pydicom():
                    self.ds.pixel_array_options(index=index, decoding_plugin=plugin)
                    return self.ds.pixel_array
            except BaseException as e:  # pydicom and its plugins raise many types on damaged or unsupported data
                if not (isinstance(e, Exception) or _is_decoder_panic(e)):
                    raise  # KeyboardInterrupt, SystemExit, ...
                error = error or e
            finally:
                self.ds._pixel_array = None  # do not keep a frame cached under the all-frames options
        raise MedicalImageError(f"{source_label(self.path)}: cannot decode DICOM pixel data ({self._syntax_text()}; "
                                f"{safe_reason(error)})") from None

    def _syntax_text(self) -> str:
        """The transfer syntax as an error may name it: a registered DICOM transfer syntax's name, never the header's
        own text (a damaged or hand-made UID can hold anything)."""
        try:
            if self._syntax is not None and self._syntax.is_transfer_syntax:
                return f"transfer syntax '{self._syntax.name}'"
        except (ValueError, AttributeError):  # a private or malformed UID
            pass
        return "an unregistered transfer syntax"

    def preload_frames(self) -> None:
        """Decode every frame of a multi-frame file at once (faster than one decode per frame)."""
        if self.count > 1 and self.frames is None:
            self.frames = self._decode(None)

    def frame_pixels(self, index: int) -> np.ndarray:
        """Stored values of one frame: (H, W) or (H, W, 3) (colour already RGB by pydicom)."""
        if self.count == 1:
            return self._decode(None)
        return self.frames[index] if self.frames is not None else self._decode(index)

    def image(self, index: int) -> MedicalImage:
        arr = self.frame_pixels(index)
        check_finite(arr, source_label(self.path))
        try:
            with quiet_pydicom():
                unit, window, window_name = self._to_unit(arr, index)
        except MedicalImageError:
            raise
        except Exception as e:
            raise MedicalImageError(f"{source_label(self.path)}: cannot map DICOM pixel values ({safe_reason(e)})") \
                from None
        spacing = self.spacing
        if unit.ndim == 2:
            unit, spacing = square_pixels(unit, spacing, nearest=False, path=self.path)
        return MedicalImage(pixels=to_uint8(unit), modality=self.modality, body_part=self.body_part,
                            pixel_spacing=spacing, orientation=self.orientation, index=index, count=self.count,
                            source_format="dicom", window=window, window_name=window_name,
                            photometric=self.photometric, source_size=(self.rows, self.columns))

    def _to_unit(self, arr: np.ndarray, index: int = 0):
        """Stored values -> [0, 1] float32, plus the window (centre, width) and how it was chosen."""
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

        ds = self.ds
        if self.photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            return rgb.astype(np.float32) / float(2 ** bits - 1), None, "palette"
        if arr.ndim == 3:  # colour: pydicom's decoders already converted YBR_* to RGB
            if arr.dtype == np.uint8:
                return arr.astype(np.float32) / 255.0, None, "none"
            bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
            return arr.astype(np.float32) / float(2 ** bits - 1), None, "bit depth"
        values = apply_modality_lut(arr, ds)
        if "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:  # enhanced multi-frame objects
            slope = _functional_group(ds, "PixelValueTransformationSequence", "RescaleSlope", index)
            intercept = _functional_group(ds, "PixelValueTransformationSequence", "RescaleIntercept", index)
            if slope is not None:
                values = values * float(slope) + float(intercept or 0.0)
        frame_center = _functional_group(ds, "FrameVOILUTSequence", "WindowCenter", index)
        frame_width = _functional_group(ds, "FrameVOILUTSequence", "WindowWidth", index)
        if self.window is not None:
            unit, window, name = apply_window(values, *self.window), self.window, self.window_name
        elif self.window_name in STRETCHES:
            unit, name = grey_unit(values, None, self.window_name, source_label(self.path))
            window = None
        elif "VOILUTSequence" in ds:
            lut = ds.VOILUTSequence[0]
            data = np.asarray(lut.LUTData)
            lo, hi = float(data.min()), float(data.max())
            voi = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            unit, window, name = (voi - lo) / max(hi - lo, 1.0), None, "file VOI LUT"
        elif ("WindowCenter" in ds and "WindowWidth" in ds) or (frame_center is not None and frame_width is not None):
            if "WindowCenter" in ds and "WindowWidth" in ds:
                center, width = first_number(ds.WindowCenter), first_number(ds.WindowWidth)
                function = ds.get("VOILUTFunction")
            else:
                center, width = first_number(frame_center), first_number(frame_width)
                function = _functional_group(ds, "FrameVOILUTSequence", "VOILUTFunction", index)
            function = str(function or "LINEAR")
            unit, window, name = apply_window(values, center, width, function), (center, width), "file"
        elif self.modality == "CT":
            name = ct_window_name(self.body_part)
            window = CT_WINDOWS[name]
            unit = apply_window(values, *window)
        else:
            unit, window, name = percentile_unit(values), None, "percentile"
        if self.photometric == "MONOCHROME1":  # low values are white
            unit = 1.0 - unit
        return np.asarray(unit, np.float32), window, name


def _functional_group(ds, sequence: str, keyword: str, frame: int = 0):
    """`keyword` from an enhanced multi-frame object's per-frame functional group of `frame`, else from the
    shared functional groups, else None (e.g. PixelMeasuresSequence / PixelSpacing)."""
    for groups, item_index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            group = ds.get(groups)[item_index]
            value = group.get(sequence)[0].get(keyword)
        except (TypeError, IndexError, AttributeError):
            continue
        if value is not None and value != "":
            return value
    return None


def first_number(value) -> float:
    """First entry of a possibly multi-valued DICOM number (several windows -> the first one)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


