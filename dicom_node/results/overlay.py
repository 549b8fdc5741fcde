"""The secondary capture's pixels: the radiograph in grey, the heat map in colour inside the lungs, the lung
contours, and a banner strip with the result and the model's notice.

Everything is burnt into RGB pixels because a secondary capture is what every PACS viewer shows, including those
that cannot overlay a SEG or read an SR. The banner is a strip added above the image rather than drawn over it, so
that it never hides the lung apices; a radiograph larger than MAX_SIDE pixels on its long side is downscaled to
it first.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ai.lungs import LEFT_LUNG, RIGHT_LUNG, bounding_box

MAX_SIDE = 2048
HEAT_ALPHA = 0.55  # opacity of the heat map where it is 1.0; it fades out towards 0
CONTOUR_COLOURS = {RIGHT_LUNG: (0, 255, 255), LEFT_LUNG: (255, 255, 0)}  # cyan / yellow, as the SEG's segments
# Anchor colours of the heat scale at 0, 0.25, 0.5, 0.75, 1 (dark blue -> cyan -> green -> yellow -> red).
HEAT_SCALE = np.array([[0, 0, 160], [0, 190, 255], [0, 220, 0], [255, 230, 0], [255, 0, 0]], dtype=np.float32)
BANNER_BACKGROUND = (0, 0, 0)
TEXT_COLOUR = (255, 255, 255)
WARNING_COLOUR = (255, 210, 0)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """float32 (..., 3) colours of a heat map in [0, 1], piecewise linear between the anchors (``np.interp`` per
    channel: one compiled pass each instead of fancy indexing on every pixel)."""
    anchors = np.linspace(0.0, 1.0, len(HEAT_SCALE))
    flat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0).ravel()
    out = np.empty((flat.size, 3), dtype=np.float32)
    for channel in range(3):
        out[:, channel] = np.interp(flat, anchors, HEAT_SCALE[:, channel])
    return out.reshape(*np.shape(heat), 3)


def grey_levels(grey: np.ndarray) -> np.ndarray:
    """uint8 grey levels of a normalised image in [0, 1] (uint8 input is taken as it is)."""
    if grey.dtype == np.uint8:
        return grey
    return np.rint(np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


HEAT_LEVELS = 256  # the heat map is blended through 8-bit lookup tables (a step of 0.4 % of the scale)


def composite(grey: np.ndarray, labels: np.ndarray, heat: np.ndarray | None) -> np.ndarray:
    """uint8 RGB: grey radiograph (``grey_levels``), heat blended inside the lungs only, contours on top.

    The heat map is quantised to 8 bits and blended by Pillow in C: its colours through a palette, its weight
    (``HEAT_ALPHA`` x heat, 0 outside the lungs) through a lookup table, and ``Image.composite`` mixes the two
    pictures. All of that runs on the lungs' bounding box only (outside it the weight is 0 and the picture is the
    grey radiograph), and each contour is drawn on its own field's box."""
    picture = Image.fromarray(grey_levels(grey), mode="L").convert("RGB")
    box = bounding_box(labels > 0)
    if heat is not None and box is not None:
        top, left, bottom, right = box
        region = (left, top, right, bottom)
        picture.paste(_blend_heat(picture.crop(region), labels[top:bottom, left:right] > 0,
                                  heat[top:bottom, left:right]), region)
    rgb = np.array(picture, dtype=np.uint8)
    width = max(1, round(max(labels.shape) / 600))  # about 3 px on a 2k image, still visible after downscaling
    for value, colour in CONTOUR_COLOURS.items():
        field_box = bounding_box(labels == value)
        if field_box is None:
            continue
        top, left, bottom, right = field_box
        # one pixel of margin: the erosion sees the same background as on the whole grid
        rows = slice(max(top - 1, 0), bottom + 1)
        cols = slice(max(left - 1, 0), right + 1)
        rgb[rows, cols][inner_edge(labels[rows, cols] == value, width)] = colour
    return rgb


def _blend_heat(picture: Image.Image, lungs: np.ndarray, heat: np.ndarray) -> Image.Image:
    """``picture`` with the heat map's colours blended in, weight ``HEAT_ALPHA`` x heat inside ``lungs``."""
    heat8 = np.rint(np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0) * (HEAT_LEVELS - 1)).astype(np.uint8)
    scale = np.linspace(0.0, 1.0, HEAT_LEVELS)
    colours = Image.fromarray(heat8, mode="P")
    colours.putpalette(np.clip(np.rint(heat_colours(scale)), 0, 255).astype(np.uint8).ravel().tobytes())
    weight_table = np.rint(255.0 * HEAT_ALPHA * scale).astype(np.uint8)
    weight = np.asarray(Image.fromarray(heat8, mode="L").point(weight_table.tolist()), dtype=np.uint8) * lungs
    return Image.composite(colours.convert("RGB"), picture, Image.fromarray(weight, mode="L"))


def inner_edge(field: np.ndarray, width: int) -> np.ndarray:
    """The pixels of a boolean ``field`` within ``width`` steps (4-connected) of its outside, the outside of the
    array included: ``field & ~ndimage.binary_erosion(field, iterations=width, border_value=0)``, by whole-array
    shifts (a tenth of the time on a 2k lung field)."""
    padded = np.pad(np.asarray(field, dtype=bool), 1)  # the ring stays False: border_value=0
    core = padded[1:-1, 1:-1]
    for _ in range(width):
        eroded = core & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        padded[1:-1, 1:-1] = eroded
    return np.asarray(field, dtype=bool) & ~core


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled font at ``size`` pixels (scalable with FreeType, as Pillow >= 10.1 ships it)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # an old Pillow without a scalable default font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, line: str, face, width: int) -> list[str]:
    """Break a line into pieces that fit ``width`` pixels (by characters, then re-measured)."""
    if draw.textlength(line, font=face) <= width:
        return [line]
    average = max(1.0, draw.textlength(line, font=face) / len(line))
    return textwrap.wrap(line, width=max(10, int(width / average))) or [line]


def banner_strip(cols: int, lines: Sequence[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """A black strip ``cols`` pixels wide holding ``lines`` (text, colour), the font scaled to the width."""
    size = max(14, round(cols / 55))
    face = font(size)
    margin = max(4, size // 2)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [(piece, colour) for text, colour in lines for piece in _wrap(scratch, text, face, cols - 2 * margin)]
    line_height = round(size * 1.3)
    banner = Image.new("RGB", (cols, 2 * margin + line_height * len(wrapped)), BANNER_BACKGROUND)
    draw = ImageDraw.Draw(banner)
    for k, (text, colour) in enumerate(wrapped):
        draw.text((margin, margin + k * line_height), text, fill=colour, font=face)
    return np.asarray(banner, dtype=np.uint8)


def _size(shape: tuple[int, ...], factor: float) -> tuple[int, int]:
    """(width, height) of ``shape`` scaled by ``factor``, as Pillow takes it."""
    return max(1, round(shape[1] * factor)), max(1, round(shape[0] * factor))


def resize(image: np.ndarray, factor: float) -> np.ndarray:
    """An RGB picture scaled by ``factor`` (Lanczos); unchanged when ``factor`` >= 1."""
    if factor >= 1:
        return image
    return np.asarray(Image.fromarray(image).resize(_size(image.shape, factor), Image.Resampling.LANCZOS),
                      dtype=np.uint8)


def downscaled_inputs(grey: np.ndarray, labels: np.ndarray, heat: np.ndarray | None,
                      factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The picture's inputs on the output grid: the grey levels by Lanczos (one 8-bit channel), the heat map
    bilinearly (it is smooth: upsampled from the classifier's 12 x 12 features), the labels by nearest neighbour (a
    pixel is one field or the other, never a blend). Compositing then runs on the output grid: one channel resized
    instead of three, and a blend and contours over fewer pixels (a 2.5k Philips CR: 0.39 -> 0.2 s); the contours
    are drawn at the output resolution, so they keep one width however large the source."""
    if factor >= 1:
        return grey, labels, heat
    size = _size(labels.shape, factor)
    small_grey = np.asarray(Image.fromarray(grey_levels(grey), mode="L").resize(size, Image.Resampling.LANCZOS))
    small_labels = np.asarray(Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L")
                              .resize(size, Image.Resampling.NEAREST))
    small_heat = None if heat is None else np.asarray(
        Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    return small_grey, small_labels, small_heat


def render(grey: np.ndarray, labels: np.ndarray, heat: np.ndarray | None,
           banner: Sequence[tuple[str, tuple[int, int, int]]], max_side: int = MAX_SIDE) -> np.ndarray:
    """The whole secondary-capture picture: the radiograph at most ``max_side`` pixels on its long side, and the
    banner strip added above it at the picture's final width (the text is drawn at the final resolution). A
    radiograph within ``max_side`` keeps its own grid: no resampling at all (which was a third of the picture's
    time on a 1955 x 1841 CR, for a 5 % reduction that only made room for the banner)."""
    rows, cols = labels.shape
    factor = min(1.0, max_side / max(rows, cols))
    picture = composite(*downscaled_inputs(grey, labels, heat, factor))
    return np.concatenate([banner_strip(picture.shape[1], banner), picture], axis=0)
