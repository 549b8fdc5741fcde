"""From a DICOM dataset (any vendor, any transfer syntax) or a PNG/JPEG file to the image a radiologist sees.

The result is float32 in [0, 1] on the source's native pixel grid, lungs dark, bone bright:

1. stored values -> modality values (Rescale Slope/Intercept or a Modality LUT Sequence), signed or unsigned,
   8 to 16 bits stored; Pixel Padding Value / Range marks pixels excluded from every statistic (output 0);
2. VOI: the first Window Center/Width (VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID) or a VOI LUT Sequence;
   with none, a robust percentile window computed inside the collimated field;
3. MONOCHROME1, or a Presentation LUT Shape of INVERSE, inverts the result once (DX requires INVERSE together
   with MONOCHROME1: both say the same thing and must not cancel out).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

DICOM_SUFFIXES = {".dcm", ".dicom", ""}
PERCENTILE_WINDOW = (0.5, 99.5)


class UnreadableImage(ValueError):
    """The file or dataset cannot be turned into an image (no pixel data, undecodable, wrong shape)."""


@dataclass
class NormalisedImage:
    pixels: np.ndarray  # float32 (rows, columns) in [0, 1], lungs dark
    pixel_spacing_mm: tuple[float, float] | None  # (row, column) spacing; None when unknown or "0"
    kind: str  # "dicom" | "png" | "jpeg" | ...
    steps: list[str] = field(default_factory=list)  # which branches were taken, for tests and audits
    padding_mask: np.ndarray | None = None  # True where the pixel is padding


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Stored pixel values of a single-frame grayscale image.

    pydicom decodes everything we accept with the installed non-GPL plugins except 12-bit JPEG Extended, which
    its GDCM plugin refuses although GDCM itself decodes it: for that case GDCM's own reader is used.
    """
    try:
        array = ds.pixel_array
    except Exception as exc:  # plugins raise RuntimeError, NotImplementedError, ValueError...
        # getattr: a dataset built in memory may have no file meta at all; it must still end in UnreadableImage.
        if str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.4.51":
            array = _decode_with_gdcm(ds)
        else:
            raise UnreadableImage(f"pixel data cannot be decoded ({type(exc).__name__})") from None
    if array.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        raise UnreadableImage("multi-frame image")
    if array.ndim != 2:
        raise UnreadableImage("not a single-frame grayscale image")
    return array


def _decode_with_gdcm(ds: Dataset) -> np.ndarray:
    import gdcm  # python-gdcm, BSD

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.dcm")
        ds.save_as(path, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(path)
        if not reader.Read():
            raise UnreadableImage("pixel data cannot be decoded (GDCM)")
        image = reader.GetImage()
        pixel_format = image.GetPixelFormat()
        dtype = {
            (8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16,
        }[(pixel_format.GetBitsAllocated(), pixel_format.GetPixelRepresentation())]
        buffer = image.GetBuffer().encode("utf-8", errors="surrogateescape")
        rows, cols = int(ds.Rows), int(ds.Columns)
        return np.frombuffer(buffer, dtype=dtype)[: rows * cols].reshape(rows, cols).copy()


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    if "PixelPaddingValue" not in ds:
        return None
    value = int(ds.PixelPaddingValue)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == value
    lo, hi = sorted((value, int(limit)))
    return (stored >= lo) & (stored <= hi)


def _modality_lut(ds: Dataset, stored: np.ndarray, steps: list[str]) -> np.ndarray:
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        item = ds.ModalityLUTSequence[0]
        steps.append("modality_lut_sequence")
        return _apply_lut(item, stored)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        steps.append("rescale")
    return stored.astype(np.float64) * slope + intercept


def _apply_lut(item: Dataset, values: np.ndarray) -> np.ndarray:
    """Apply a LUT item (LUT Descriptor + LUT Data) as defined in PS3.3 C.11.1: clamp outside the table."""
    count, first, bits = (int(v) for v in item.LUTDescriptor)
    count = count or 65536
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        data = np.frombuffer(raw, dtype=np.uint16 if bits > 8 else np.uint8)
    else:
        data = np.asarray(raw if isinstance(raw, (list, tuple)) or hasattr(raw, "__len__") else [raw])
    data = np.asarray(data, dtype=np.float64)[:count]
    index = np.clip(np.round(values).astype(np.int64) - first, 0, len(data) - 1)
    return data[index]


def _first(value: object) -> float:
    if isinstance(value, (list, tuple)) or (hasattr(value, "__getitem__") and not isinstance(value, str)):
        return float(value[0])  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def _voi(ds: Dataset | None, values: np.ndarray, valid: np.ndarray, steps: list[str]) -> np.ndarray:
    if ds is not None and "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        steps.append("voi_lut_sequence")
        out = _apply_lut(item, values)
        top = float(out.max()) if bits > 16 else float(2**bits - 1)
        return out / max(top, 1.0)
    if ds is not None and "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if width > 0:
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
            if function == "SIGMOID":
                steps.append("window_sigmoid")
                return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
            if function == "LINEAR_EXACT":
                steps.append("window_linear_exact")
                return (values - (centre - width / 2)) / width
            steps.append("window_linear")
            # PS3.3 C.11.2.1.2.1; for w = 1 the ramp degenerates to x <= c - 0.5 -> 0, x > c - 0.5 -> 1
            return ((values - (centre - 0.5)) / (width - 1)) + 0.5 if width > 1 else (values > centre - 0.5) * 1.0
    steps.append("percentile_window")
    lo, hi = robust_window(values, valid)
    return (values - lo) / max(hi - lo, 1e-6)


def robust_window(values: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Percentile window inside the collimated field: padding and the flat collimator extremes are excluded."""
    inside = values[valid]
    if inside.size == 0:
        return float(values.min()), float(values.max())
    vmin, vmax = inside.min(), inside.max()
    field_values = inside[(inside > vmin) & (inside < vmax)]
    if field_values.size < inside.size * 0.05:  # nearly binary image: keep everything
        field_values = inside
    lo, hi = np.percentile(field_values, PERCENTILE_WINDOW)
    return float(lo), float(hi)


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing, else Imager Pixel Spacing; None when absent, malformed or zero (a real-world quirk)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return row, col
    return None


def normalise_dataset(ds: Dataset, stored: np.ndarray | None = None) -> NormalisedImage:
    """``stored``: the already decoded pixel values, when the caller timed decoding separately."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnreadableImage(f"photometric interpretation {photometric or 'missing'} is not grayscale")
    if stored is None:
        stored = decode_pixels(ds)
    steps: list[str] = []
    padding = _padding_mask(ds, stored)
    valid = ~padding if padding is not None else np.ones(stored.shape, dtype=bool)
    if padding is not None:
        steps.append("padding_excluded")
    values = _modality_lut(ds, stored, steps)
    image = np.clip(_voi(ds, values, valid, steps), 0.0, 1.0)
    invert = photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if invert:
        steps.append("inverted")
        image = 1.0 - image
    if padding is not None:
        image[padding] = 0.0
    return NormalisedImage(image.astype(np.float32), pixel_spacing(ds), "dicom", steps, padding)


def normalise_picture(path: Path) -> NormalisedImage:
    """PNG/JPEG (the training data): 8- or 16-bit grayscale or colour, already display-ready."""
    with Image.open(path) as img:
        kind = (img.format or path.suffix.lstrip(".")).lower()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(img, dtype=np.float64)
            # A 16-bit file is on a 0..65535 scale whatever its content (a dark one must stay dark); only the
            # 32-bit "I" mode, whose depth is not declared, keeps the guess.
            top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        else:
            array = np.asarray(img.convert("L"), dtype=np.float64)
            top = 255.0
    return NormalisedImage((array / top).clip(0, 1).astype(np.float32), None, kind, ["picture"])


def is_dicom_file(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def normalise(source: Dataset | Path | str) -> NormalisedImage:
    """One entry point for datasets, DICOM files and PNG/JPEG files."""
    if isinstance(source, Dataset):
        return normalise_dataset(source)
    path = Path(source)
    if is_dicom_file(path):
        try:
            ds = dcmread(path)
        except Exception as exc:
            raise UnreadableImage(f"not a readable DICOM file ({type(exc).__name__})") from None
        return normalise_dataset(ds)
    try:
        return normalise_picture(path)
    except (OSError, ValueError) as exc:
        raise UnreadableImage(f"not a readable image file ({type(exc).__name__})") from None


def stretch_contrast(pixels: np.ndarray, valid: np.ndarray | None = None,
                     percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Model-input standardisation: map the given percentiles of the (valid) pixels to 0 and 1, then choose a gamma
    that puts the median at 0.5.

    Header windows differ wildly between vendors (the Philips sample's window is so wide that its lungs are mid-grey);
    the models see every image, training PNG or DICOM, with the same contrast rule. Black letterbox padding is
    excluded through ``valid``.
    """
    inside = pixels[valid] if valid is not None else pixels.ravel()
    if inside.size == 0:
        return pixels.astype(np.float32)
    lo, hi = np.percentile(inside, percentiles)
    if hi - lo < 1e-3:
        return np.clip(pixels, 0, 1).astype(np.float32)
    out = np.clip((pixels - lo) / (hi - lo), 0, 1)
    median = float(np.median(out[valid] if valid is not None else out))
    if 0.0 < median < 1.0:
        gamma = float(np.clip(np.log(0.5) / np.log(median), 0.4, 3.5))
        out = out ** gamma
    out = out.astype(np.float32)
    if valid is not None:
        out[~valid] = 0.0
    return out
