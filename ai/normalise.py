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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from . import header_values
from .decoding import (
    DECODE_TIMEOUT,
    DecoderCrashed,
    DecoderTimeout,
    DecoderUnavailable,
    UndecodablePixels,
    UnreadableImage,
    decode,
)
from .limits import DEFAULT_LIMITS, ImageLimits, ImageTooLarge, read_dataset_bounded

__all__ = ["DECODE_TIMEOUT", "DecoderCrashed", "DecoderTimeout", "DecoderUnavailable", "NormalisedImage",
           "UndecodablePixels", "UnreadableImage", "decode_pixels", "is_dicom_file", "normalise",
           "normalise_dataset", "normalise_picture", "pixel_spacing", "read_image_file", "robust_window",
           "stretch_contrast"]

PERCENTILE_WINDOW = (0.5, 99.5)


@dataclass
class NormalisedImage:
    pixels: np.ndarray  # float32 (rows, columns) in [0, 1], lungs dark
    pixel_spacing_mm: tuple[float, float] | None  # (row, column) spacing; None when unknown or "0"
    kind: str  # "dicom" | "png" | "jpeg" | ...
    steps: list[str] = field(default_factory=list)  # which branches were taken, for tests and audits
    padding_mask: np.ndarray | None = None  # True where the pixel is padding


def decode_pixels(ds: Dataset, timeout: float = DECODE_TIMEOUT) -> np.ndarray:
    """Stored pixel values of a single-frame grayscale image.

    Native syntaxes decode in-process; compressed ones in the crash-isolated decoder process with the plugin order
    of ``ai.decoding.PLUGIN_ORDER`` (12-bit JPEG Extended, which pydicom's GDCM plugin refuses, with GDCM's own
    reader). Raises :class:`UnreadableImage` (``UndecodablePixels``, ``DecoderCrashed``, ``DecoderTimeout``, ...)
    and nothing else; ``timeout``: seconds a compressed image may take to decode.
    """
    array = decode(ds, timeout).array
    samples = header_values.integer(ds, "SamplesPerPixel") or 1
    if array.ndim == 3 and samples == 1:
        raise UnreadableImage("multi-frame image", reason="multi_frame")
    if array.ndim != 2:
        raise UnreadableImage("not a single-frame grayscale image", reason="not_monochrome")
    return array


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    value = header_values.integer(ds, "PixelPaddingValue")  # malformed: treated as absent
    if value is None:
        return None
    limit = header_values.integer(ds, "PixelPaddingRangeLimit")
    if limit is None:
        return stored == value
    lo, hi = sorted((value, limit))
    return (stored >= lo) & (stored <= hi)


def _lut_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of a LUT sequence when it is usable (descriptor of three numbers and data); else None."""
    try:
        sequence = ds.get(keyword)
        if not sequence:
            return None
        item = sequence[0]
        if len(item.LUTDescriptor) != 3 or item.get("LUTData") is None:
            return None
        [int(v) for v in item.LUTDescriptor]
        return item
    except Exception:  # malformed optional attribute: absent
        return None


def _modality_lut(ds: Dataset, stored: np.ndarray, steps: list[str]) -> np.ndarray:
    item = _lut_item(ds, "ModalityLUTSequence")
    if item is not None:
        steps.append("modality_lut_sequence")
        return _apply_lut(item, stored)
    slope = header_values.decimal(ds, "RescaleSlope")
    intercept = header_values.decimal(ds, "RescaleIntercept")
    slope = slope if slope else 1.0  # absent, malformed or zero: identity
    intercept = intercept or 0.0
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


WindowSource = Callable[[], tuple[float, float]]
"""The percentile window's (low, high), computed only when the header gives no window."""


def _voi(ds: Dataset | None, values: np.ndarray, window: WindowSource, steps: list[str]) -> np.ndarray:
    item = _lut_item(ds, "VOILUTSequence") if ds is not None else None
    if item is not None:
        bits = int(item.LUTDescriptor[2])
        steps.append("voi_lut_sequence")
        out = _apply_lut(item, values)
        top = float(out.max()) if bits > 16 else float(2**bits - 1)
        return out / max(top, 1.0)
    # Read leniently: "40 400" (spaces for backslashes) and "0,5" (decimal comma) are understood; a malformed
    # window is absent (the percentile window below).
    centre = header_values.decimal(ds, "WindowCenter") if ds is not None else None
    width = header_values.decimal(ds, "WindowWidth") if ds is not None else None
    if centre is not None and width is not None and width > 0:
        function = header_values.text(ds, "VOILUTFunction") or "LINEAR"  # type: ignore[arg-type]
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
    lo, hi = window()
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
    """The spacing the lung areas are measured with: Pixel Spacing (calibrated to the patient), else Imager Pixel
    Spacing (at the detector); None when absent, malformed or zero (a real-world quirk). Why this order, and why the
    SR's image library prefers the other: ``ai.header_values.pixel_spacing``.

    Read leniently: ``0.14 0.14`` and ``0,139\\0,139`` are (0.14, 0.14) and (0.139, 0.139)."""
    return header_values.pixel_spacing(ds, header_values.ANATOMY_SPACING)


def normalise_dataset(ds: Dataset, stored: np.ndarray | None = None,
                      decode_timeout: float = DECODE_TIMEOUT) -> NormalisedImage:
    """``stored``: the already decoded pixel values, when the caller timed decoding separately.

    Every step is a function of the stored value alone (the percentile window's two numbers aside), so integer
    images of up to ``LUT_MAX_RANGE`` distinct stored values are mapped through one table computed per value in
    float64: the same numbers as the per-pixel computation (``_pixelwise``, the fallback for floating-point or very
    wide data, checked against it in tests) in one gather pass instead of several float64 passes over up to 4k x 4k
    pixels."""
    photometric = header_values.text(ds, "PhotometricInterpretation")
    if not photometric:
        raise UnreadableImage("photometric interpretation missing: not grayscale", reason="not_monochrome")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnreadableImage("photometric interpretation is not grayscale", reason="not_monochrome")
    if stored is None:
        stored = decode_pixels(ds, decode_timeout)
    steps: list[str] = []
    padding = _padding_mask(ds, stored)
    if padding is not None:
        steps.append("padding_excluded")
    invert = photometric == "MONOCHROME1" or header_values.text(ds, "PresentationLUTShape") == "INVERSE"
    lut = _lookup_table(ds, stored, padding, invert, steps) if stored.dtype.kind in "iub" else None
    if lut is not None:
        table, index = lut
        image = np.take(table, index)
    else:
        image = _pixelwise(ds, stored, padding, invert, steps)
    if padding is not None:
        image[padding] = 0.0
    return NormalisedImage(image, pixel_spacing(ds), "dicom", steps, padding)


LUT_MAX_RANGE = 1 << 20
"""Widest range of stored values mapped through a table (16 bits stored have at most 65,536)."""


def _to_display(ds: Dataset, values: np.ndarray, window: WindowSource, invert: bool, steps: list[str]) -> np.ndarray:
    """Modality values -> float32 display values in [0, 1]: VOI, clip, inversion (per value: pixels or a table)."""
    image = np.clip(_voi(ds, values, window, steps), 0.0, 1.0)
    if invert:
        steps.append("inverted")
        image = 1.0 - image
    return image.astype(np.float32)


def _pixelwise(ds: Dataset, stored: np.ndarray, padding: np.ndarray | None, invert: bool,
               steps: list[str]) -> np.ndarray:
    valid = ~padding if padding is not None else np.ones(stored.shape, dtype=bool)
    values = _modality_lut(ds, stored, steps)
    return _to_display(ds, values, lambda: robust_window(values, valid), invert, steps)


def _lookup_table(ds: Dataset, stored: np.ndarray, padding: np.ndarray | None, invert: bool,
                  steps: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(float32 table, index of each pixel into it) or None when the stored range is too wide for a table.

    The table covers every value from 0 (or the lowest, for negative stored values) to the highest; the pixel counts
    per value (a pass over the image) are taken only when a step needs them: the percentile window, and a VOI LUT
    of more than 16 bits, which is scaled by its largest output over the values that occur."""
    if stored.size == 0:
        return None
    low, high = int(stored.min()), int(stored.max())
    base = min(low, 0)
    if high - base >= LUT_MAX_RANGE:
        return None
    index = stored if base == 0 else stored.astype(np.int32) - base
    size = high - base + 1
    counted: dict[str, np.ndarray] = {}

    def counts(valid_only: bool) -> np.ndarray:
        if "all" not in counted:
            counted["all"] = np.bincount(index.ravel(), minlength=size)
            counted["valid"] = counted["all"]
            if padding is not None and padding.any():
                counted["valid"] = counted["all"] - np.bincount(index[padding].ravel(), minlength=size)
        return counted["valid" if valid_only else "all"]

    voi_lut = _lut_item(ds, "VOILUTSequence")
    sparse = voi_lut is not None and int(voi_lut.LUTDescriptor[2]) > 16
    rows = np.flatnonzero(counts(False)) if sparse else np.arange(size)
    values = _modality_lut(ds, rows + base, steps)

    def window() -> tuple[float, float]:
        return _weighted_window(values, counts(True)[rows], counts(False)[rows])

    table = np.zeros(size, dtype=np.float32)
    table[rows] = _to_display(ds, values, window, invert, steps)
    return table, index


def _weighted_window(values: np.ndarray, counts: np.ndarray, all_counts: np.ndarray) -> tuple[float, float]:
    """``robust_window`` of the pixels from the modality values of the stored values and how many valid pixels
    (``counts``) and pixels (``all_counts``) have each: the same two numbers as numpy's linear percentile over every
    pixel (its index and interpolation arithmetic are reproduced, so the windows agree to the last bit)."""
    keep = counts > 0
    if not keep.any():  # every pixel is padding: the range of all of them, as robust_window
        occurring = values[all_counts > 0]
        return float(occurring.min()), float(occurring.max())
    values, counts = values[keep], counts[keep]
    order = np.argsort(values, kind="stable")
    values, counts = values[order], counts[order]
    inside = (values > values[0]) & (values < values[-1])
    if counts[inside].sum() < counts.sum() * 0.05:  # nearly binary image: keep everything
        inside = np.ones_like(inside)
    values, counts = values[inside], counts[inside]
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])

    def nth(k: int) -> float:  # the k-th smallest pixel value (0-based)
        return float(values[int(np.searchsorted(cumulative, min(max(k, 0), n - 1), side="right"))])

    out = []
    for q in PERCENTILE_WINDOW:
        quantile = np.float64(q) / 100
        virtual = (n - 1) * quantile  # numpy's virtual index for "linear"
        below = np.floor(virtual)
        gamma = float(virtual - below)
        lower, upper = nth(int(below)), nth(int(below) + 1)
        difference = upper - lower
        out.append(lower + difference * gamma if gamma < 0.5 else upper - difference * (1 - gamma))
    return out[0], out[1]


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
    """A DICOM Part 10 file: the DICM marker after the 128-byte preamble."""
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


_ENCODING_SYNTAX: dict[tuple[bool | None, bool | None], str] = {
    (True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1", (False, False): "1.2.840.10008.1.2.2"}


def _is_picture(path: Path) -> bool:
    try:
        with Image.open(path):
            return True
    except Exception:  # not a format Pillow knows (or not a file Pillow can open)
        return False


def read_image_file(path: Path | str, limits: ImageLimits = DEFAULT_LIMITS) -> Dataset | None:
    """Read ``path`` as DICOM, or return None for a picture (PNG/JPEG ...) that Pillow can open.

    Besides DICOM Part 10 files (DICM marker), a dataset with no preamble and no file meta (an old ACR-NEMA-style
    export) is read with pydicom's ``force``: it counts as DICOM only when it has a SOP Class UID or Pixel Data, and
    its transfer syntax is set from the encoding pydicom found (implicit or explicit VR, little or big endian).
    Nothing larger than ``limits`` is inflated or loaded (:class:`ai.limits.ImageTooLarge`).
    Raises :class:`UnreadableImage` for a file that is neither, ``OSError`` (``FileNotFoundError`` ...) when the
    file cannot be opened at all."""
    path = Path(path)
    if is_dicom_file(path):
        try:
            ds = read_dataset_bounded(path, limits)
        except ImageTooLarge:
            raise
        except Exception:
            raise UnreadableImage("not a readable DICOM file") from None
        if "SOPClassUID" not in ds:
            raise UnreadableImage("not a readable DICOM dataset (no SOP Class UID)")
        return ds
    if _is_picture(path):
        return None
    try:
        ds = read_dataset_bounded(path, limits, force=True)
    except ImageTooLarge:
        raise
    except Exception:
        raise UnreadableImage("not a readable image file") from None
    if not (header_values.uid(ds, "SOPClassUID") or "PixelData" in ds):
        raise UnreadableImage("not a readable image file (neither DICOM nor a picture)")
    meta = getattr(ds, "file_meta", None)
    if not isinstance(meta, FileMetaDataset):
        meta = ds.file_meta = FileMetaDataset()
    if not header_values.uid(meta, "TransferSyntaxUID"):
        implicit_vr, little_endian = getattr(ds, "original_encoding", (None, None))
        syntax = _ENCODING_SYNTAX.get((implicit_vr, little_endian))
        if syntax is None:
            raise UnreadableImage("not a readable DICOM dataset (unknown encoding)")
        meta.TransferSyntaxUID = UID(syntax)
    return ds


def normalise(source: Dataset | Path | str, decode_timeout: float = DECODE_TIMEOUT) -> NormalisedImage:
    """One entry point for datasets, DICOM files (with or without file meta) and PNG/JPEG files."""
    if isinstance(source, Dataset):
        return normalise_dataset(source, decode_timeout=decode_timeout)
    path = Path(source)
    ds = read_image_file(path)
    if ds is not None:
        return normalise_dataset(ds, decode_timeout=decode_timeout)
    try:
        return normalise_picture(path)
    except (OSError, ValueError):
        raise UnreadableImage("not a readable image file") from None


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
