"""ai.normalise and ai.geometry: from a DICOM dataset or a PNG/JPEG file to the image a radiologist sees, and back.

Real files: the four Philips CR chest encodings must give the same image (lossless identical, lossy within compression
error) with lungs darker than the mediastinum. Synthetic datasets: one per branch of the Modality LUT / VOI /
Presentation pipeline, with expected outputs worked out by hand from PS3.3 C.11 (never by calling the code under
test). Letterbox: geometry and native-grid round trip. stretch_contrast: the model-input contrast rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from ai.geometry import Letterbox
from ai.normalise import UnreadableImage, normalise, stretch_contrast

from .support.data import CHEST_UNCOMPRESSED as CHEST_UNCOMPRESSED_PATH
from .support.data import sample_files

# --------------------------------------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------------------------------------

CHEST_UNCOMPRESSED = CHEST_UNCOMPRESSED_PATH.name
LOSSLESS = ("RG1_J2KR.dcm",)
# Measured (RG1_UNCR as reference): J2KI mean 0.0017 / max 0.0134; JLSN (near lossless) mean 7.4e-5 / max 1.3e-4.
LOSSY_LIMITS = {  # (mean abs diff, max abs diff): a few times the measured error, far below any real change
    "RG1_J2KI.dcm": (0.005, 0.05),
    "RG1_JLSN_Philips_CR_chest_JPEGLS_near_lossless.dcm": (5e-4, 1e-3),
}


@pytest.fixture(scope="module")
def chest():
    files = sample_files("chest")
    assert {f.name for f in files} == {CHEST_UNCOMPRESSED, *LOSSLESS, *LOSSY_LIMITS}
    return {f.name: (dcmread(f, stop_before_pixels=True), normalise(f)) for f in files}


def test_chest_samples_shape_dtype_range_spacing(chest):
    for name, (header, image) in chest.items():
        assert image.kind == "dicom"
        assert image.pixels.dtype == np.float32, name
        assert image.pixels.shape == (int(header.Rows), int(header.Columns)) == (1955, 1841), name
        assert 0.0 <= float(image.pixels.min()) and float(image.pixels.max()) <= 1.0, name
        assert float(image.pixels.max()) - float(image.pixels.min()) > 0.5, name  # not a flat image
        # Philips writes Pixel Spacing "0.000\0.000": unknown, not zero.
        assert [float(v) for v in header.PixelSpacing] == [0.0, 0.0]
        assert image.pixel_spacing_mm is None, name
        # MONOCHROME1 with a header window: the first window, then one inversion.
        assert header.PhotometricInterpretation == "MONOCHROME1"
        assert image.steps == ["window_linear", "inverted"], name
        assert image.padding_mask is None


def test_chest_transfer_syntaxes_give_the_same_image(chest):
    reference = chest[CHEST_UNCOMPRESSED][1].pixels
    for name in LOSSLESS:
        assert float(np.abs(chest[name][1].pixels - reference).max()) < 1e-6, name
    for name, (mean_limit, max_limit) in LOSSY_LIMITS.items():
        diff = np.abs(chest[name][1].pixels - reference)
        assert float(diff.mean()) < mean_limit, (name, float(diff.mean()))
        assert float(diff.max()) < max_limit, (name, float(diff.max()))


def test_chest_lungs_darker_than_mediastinum(chest):
    for name, (_, image) in chest.items():
        pixels = image.pixels
        rows, cols = pixels.shape

        def box(c0: float, c1: float, pixels: np.ndarray = pixels, rows: int = rows, cols: int = cols) -> float:
            return float(pixels[int(rows * 0.30):int(rows * 0.60), int(cols * c0):int(cols * c1)].mean())

        right_lung, left_lung, mediastinum = box(0.15, 0.35), box(0.65, 0.85), box(0.45, 0.55)
        # Measured on RG1_UNCR: 0.64, 0.60 against 0.87.
        assert right_lung < mediastinum - 0.1, (name, right_lung, mediastinum)
        assert left_lung < mediastinum - 0.1, (name, left_lung, mediastinum)


def test_dataset_and_path_inputs_agree():
    path = CHEST_UNCOMPRESSED_PATH
    from_path = normalise(path)
    from_str = normalise(str(path))
    from_dataset = normalise(dcmread(path))
    assert np.array_equal(from_path.pixels, from_dataset.pixels)
    assert np.array_equal(from_path.pixels, from_str.pixels)


def test_agfa_imager_pixel_spacing():
    files = [f for f in sample_files("not-chest") if "Agfa_16x16" in f.name]
    assert len(files) == 3
    for path in files:
        header = dcmread(path, stop_before_pixels=True)
        assert "PixelSpacing" not in header
        assert [float(v) for v in header.ImagerPixelSpacing] == [0.1, 0.1]
        image = normalise(path)
        assert image.pixel_spacing_mm == (0.1, 0.1)
        assert image.pixels.shape == (16, 16) and image.pixels.dtype == np.float32
        assert 0.0 <= float(image.pixels.min()) and float(image.pixels.max()) <= 1.0
        assert image.steps == ["rescale", "window_linear", "inverted"]


# --------------------------------------------------------------------------------------------------------------------
# Synthetic datasets
# --------------------------------------------------------------------------------------------------------------------


def make_ds(array: np.ndarray, bits_stored: int | None = None, photometric: str = "MONOCHROME2",
            bits_allocated: int | None = None, **attrs) -> Dataset:
    """A single-frame grayscale dataset holding ``array`` (its dtype gives Bits Allocated and the sign)."""
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[None, :]
    bits_allocated = bits_allocated or array.dtype.itemsize * 8
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image - For Presentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if array.dtype.kind == "i" else 0
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = array.astype(array.dtype.newbyteorder("<")).tobytes()
    return ds


def lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    return item


def out(ds: Dataset):
    image = normalise(ds)
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (int(ds.Rows), int(ds.Columns))
    assert image.kind == "dicom"
    return image


def test_rescale_slope_intercept_then_linear_exact_window():
    # stored 0..1000 -> modality 2x - 1000 = -1000..1000; LINEAR_EXACT c=0 w=2000: y = (x - c) / w + 0.5
    ds = make_ds(np.array([0, 250, 500, 750, 1000, 1200], np.uint16), RescaleSlope=2, RescaleIntercept=-1000,
                 WindowCenter=0, WindowWidth=2000, VOILUTFunction="LINEAR_EXACT")
    image = out(ds)
    np.testing.assert_allclose(image.pixels[0], [0.0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-7)
    assert image.steps == ["rescale", "window_linear_exact"]


def test_rescale_then_linear_window():
    # stored 0..1000 -> modality 2x - 1000; LINEAR c=0.5 w=2001: y = (x - (c - 0.5)) / (w - 1) + 0.5 = x / 2000 + 0.5
    ds = make_ds(np.array([0, 250, 500, 750, 1000], np.uint16), RescaleSlope="2", RescaleIntercept="-1000",
                 WindowCenter=0.5, WindowWidth=2001)
    image = out(ds)
    np.testing.assert_allclose(image.pixels[0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)
    assert image.steps == ["rescale", "window_linear"]


def test_identity_rescale_is_not_a_step():
    ds = make_ds(np.array([0, 255], np.uint8), RescaleSlope=1, RescaleIntercept=0, WindowCenter=128,
                 WindowWidth=256)
    assert out(ds).steps == ["window_linear"]


def test_modality_lut_sequence():
    # 5 entries, first mapped stored value 10, 16-bit entries: 10->100, 11->200, 12->400, 13->800, 14->1600;
    # stored values outside the table take the first / last entry (PS3.3 C.11.1).
    # Window LINEAR_EXACT c=800 w=1600 -> y = x / 1600.
    ds = make_ds(np.array([0, 10, 11, 12, 13, 14, 99], np.uint16),
                 ModalityLUTSequence=Sequence([lut_item([5, 10, 16], [100, 200, 400, 800, 1600])]),
                 WindowCenter=800, WindowWidth=1600, VOILUTFunction="LINEAR_EXACT",
                 RescaleSlope=5, RescaleIntercept=7)  # ignored: the sequence wins
    image = out(ds)
    np.testing.assert_allclose(image.pixels[0], [100 / 1600, 100 / 1600, 200 / 1600, 400 / 1600, 800 / 1600, 1.0,
                                                 1.0], atol=1e-7)
    assert image.steps == ["modality_lut_sequence", "window_linear_exact"]


def test_signed_int16_pixels():
    # LINEAR c=0.5 w=2001: y = x / 2000 + 0.5
    ds = make_ds(np.array([-32768, -1000, -500, 0, 500, 1000, 32767], np.int16), WindowCenter=0.5,
                 WindowWidth=2001)
    assert ds.PixelRepresentation == 1
    np.testing.assert_allclose(out(ds).pixels[0], [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-7)


def test_signed_12_bits_stored_in_16_allocated():
    # Two's complement on 12 bits: 0x0FFF = -1, 0x0800 = -2048, 0x07FF = 2047, 0x0C00 = -1024.
    # LINEAR_EXACT c=0 w=4096: y = x / 4096 + 0.5
    raw = np.array([0x0FFF, 0x0800, 0x07FF, 0x0C00, 0x0000], np.uint16).view(np.int16)
    ds = make_ds(raw, bits_stored=12, WindowCenter=0, WindowWidth=4096, VOILUTFunction="LINEAR_EXACT")
    assert ds.PixelRepresentation == 1
    expected = np.array([-1, -2048, 2047, -1024, 0]) / 4096 + 0.5
    np.testing.assert_allclose(out(ds).pixels[0], expected, atol=1e-7)


def test_8_bits_stored():
    # LINEAR c=128 w=256: y = (x - 127.5) / 255 + 0.5 = x / 255
    values = np.array([0, 1, 64, 127, 128, 200, 255], np.uint8)
    ds = make_ds(values, WindowCenter=128, WindowWidth=256)
    assert ds.BitsAllocated == 8 and ds.BitsStored == 8
    np.testing.assert_allclose(out(ds).pixels[0], values / 255.0, atol=1e-6)


def test_12_bits_stored_in_16_allocated_ignores_bits_above_high_bit():
    # LINEAR c=2048 w=4096: y = x / 4095. The high nibble is junk (old overlay planes) and must be ignored.
    values = np.array([0, 5, 2048, 4000, 4095], np.uint16)
    junk = values | np.array([0x1000, 0xF000, 0, 0x8000, 0], np.uint16)
    ds = make_ds(junk, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    np.testing.assert_allclose(out(ds).pixels[0], values / 4095.0, atol=1e-6)


def test_16_bits_full_range():
    # LINEAR c=32768 w=65536: y = (x - 32767.5) / 65535 + 0.5 = x / 65535
    values = np.array([0, 1000, 32768, 65000, 65535], np.uint16)
    ds = make_ds(values, WindowCenter=32768, WindowWidth=65536)
    np.testing.assert_allclose(out(ds).pixels[0], values / 65535.0, atol=1e-6)


def test_linear_window_follows_ps3_3_formula_at_the_edges():
    # PS3.3 C.11.2.1.2.1, c=100 w=11: x <= c - 0.5 - (w-1)/2 = 94.5 -> 0; x > c - 0.5 + (w-1)/2 = 104.5 -> 1;
    # else (x - 99.5) / 10 + 0.5.
    ds = make_ds(np.array([90, 94, 95, 99, 100, 104, 105, 110], np.uint16), WindowCenter=100, WindowWidth=11)
    np.testing.assert_allclose(out(ds).pixels[0], [0, 0, 0.05, 0.45, 0.55, 0.95, 1, 1], atol=1e-7)


def test_linear_window_of_width_one():
    # w = 1 is allowed for LINEAR: x <= c - 0.5 -> 0, x > c - 0.5 -> 1. Slope 0.1 makes fractional modality values:
    # stored 990, 994, 996, 1000 -> 99.0, 99.4, 99.6, 100.0 with c = 100 (threshold 99.5).
    ds = make_ds(np.array([990, 994, 996, 1000], np.uint16), RescaleSlope=0.1, WindowCenter=100, WindowWidth=1)
    np.testing.assert_array_equal(out(ds).pixels[0], [0.0, 0.0, 1.0, 1.0])


def test_multiple_window_values_first_is_used():
    ds = make_ds(np.array([0, 250, 500, 750, 1000], np.uint16), WindowCenter=[500, 40], WindowWidth=[1000, 400],
                 VOILUTFunction="LINEAR_EXACT")
    assert len(ds.WindowCenter) == 2
    np.testing.assert_allclose(out(ds).pixels[0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)


def test_sigmoid_window():
    # y = 1 / (1 + exp(-4 (x - c) / w)), c=100 w=50
    ds = make_ds(np.array([0, 50, 100, 125, 150], np.uint16), WindowCenter=100, WindowWidth=50,
                 VOILUTFunction="SIGMOID")
    image = out(ds)
    expected = [1 / (1 + math.exp(8)), 1 / (1 + math.exp(4)), 0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-4))]
    np.testing.assert_allclose(image.pixels[0], expected, atol=1e-6)
    assert image.steps == ["window_sigmoid"]


def test_voi_lut_sequence():
    # 4 entries from 100, 8-bit output: 100->0, 101->51, 102->102, 103->255; output / (2^8 - 1); clamped outside.
    ds = make_ds(np.array([0, 100, 101, 102, 103, 500], np.uint16),
                 VOILUTSequence=Sequence([lut_item([4, 100, 8], [0, 51, 102, 255])]),
                 WindowCenter=0, WindowWidth=10)  # a window beside a VOI LUT: the LUT is used
    image = out(ds)
    np.testing.assert_allclose(image.pixels[0], [0, 0, 0.2, 0.4, 1, 1], atol=1e-7)
    assert image.steps == ["voi_lut_sequence"]


def test_voi_lut_sequence_12_bit_output_after_rescale():
    # modality = stored - 1000; LUT of 3 entries from -1: -1->0, 0->4095, 1->2048 (12-bit output, / 4095)
    ds = make_ds(np.array([998, 999, 1000, 1001, 1002], np.uint16), RescaleIntercept=-1000,
                 VOILUTSequence=Sequence([lut_item([3, -1, 12], [0, 4095, 2048])]))
    np.testing.assert_allclose(out(ds).pixels[0], [0, 0, 1, 2048 / 4095, 2048 / 4095], atol=1e-7)


def field_image(rng: np.random.Generator) -> np.ndarray:
    """100 x 100 field holding 1001..11000 once each, shuffled.

    Robust window by hand: the field's extremes (1001 and 11000) are excluded, leaving n = 9998 values 1002..10999;
    numpy's linear percentile at p sits at index p/100 * (n - 1): 0.5 -> 49.985 -> 1051.985; 99.5 -> 9947.015 ->
    10949.015.
    """
    return rng.permutation(np.arange(1001, 11001, dtype=np.uint16)).reshape(100, 100)


FIELD_LO, FIELD_HI = 1051.985, 10949.015


def expected_window(values: np.ndarray) -> np.ndarray:
    return np.clip((values.astype(np.float64) - FIELD_LO) / (FIELD_HI - FIELD_LO), 0, 1)


def test_percentile_window_without_any_voi():
    field = field_image(np.random.default_rng(1))
    image = out(make_ds(field))
    np.testing.assert_allclose(image.pixels, expected_window(field), atol=1e-6)
    assert image.steps == ["percentile_window"]


def test_percentile_window_ignores_a_collimator_border():
    # A wide border at the field's min (top/bottom) and max (left/right): same window as the bare field.
    field = field_image(np.random.default_rng(2))
    framed = np.full((300, 260), 1001, np.uint16)
    framed[:, :60] = framed[:, -60:] = 11000
    framed[100:200, 80:180] = field
    image = out(make_ds(framed))
    np.testing.assert_allclose(image.pixels, expected_window(framed), atol=1e-6)
    assert float(image.pixels[0, 100]) == 0.0 and float(image.pixels[150, 0]) == 1.0


def test_padding_value_excluded_from_window_and_output_zero():
    # Padding at 0 (the extreme) around the field: the window must be the bare field's, padding pixels output 0.
    field = field_image(np.random.default_rng(3))
    padded = np.zeros((200, 300), np.uint16)
    padded[50:150, 100:200] = field
    image = out(make_ds(padded, PixelPaddingValue=0))
    bare = out(make_ds(field))
    np.testing.assert_allclose(bare.pixels, expected_window(field), atol=1e-6)
    np.testing.assert_array_equal(image.pixels[50:150, 100:200], bare.pixels)
    assert not image.pixels[image.padding_mask].any()
    assert image.padding_mask.sum() == 200 * 300 - 100 * 100
    assert image.steps == ["padding_excluded", "percentile_window"]


def test_padding_range_limit_excluded_from_window():
    # Padding spread over 0..1000 (Pixel Padding Value 1000, Range Limit 0: either order) would drag the low
    # percentile into the padding if counted.
    rng = np.random.default_rng(4)
    field = field_image(rng)
    padded = rng.integers(0, 1001, size=(200, 300)).astype(np.uint16)
    padded[50:150, 100:200] = field
    image = out(make_ds(padded, PixelPaddingValue=1000, PixelPaddingRangeLimit=0))
    np.testing.assert_allclose(image.pixels[50:150, 100:200], expected_window(field), atol=1e-6)
    assert image.padding_mask.sum() == 200 * 300 - 100 * 100
    assert not image.pixels[image.padding_mask].any()


def test_padding_is_black_after_monochrome1_inversion_and_with_a_window():
    # MONOCHROME1, window LINEAR_EXACT c=500 w=1000 -> y = 1 - x/1000. The padding value 600 lies inside the window
    # (it would show as 0.4): padding must come out black, 0, after the inversion.
    ds = make_ds(np.array([0, 250, 500, 750, 600], np.uint16), photometric="MONOCHROME1", PixelPaddingValue=600,
                 WindowCenter=500, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT")
    image = out(ds)
    np.testing.assert_allclose(image.pixels[0], [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
    assert image.padding_mask.tolist() == [[False, False, False, False, True]]
    assert image.steps == ["padding_excluded", "window_linear_exact", "inverted"]


def test_signed_padding_value():
    ds = make_ds(np.array([-2000, -1000, 0, 1000], np.int16), PixelPaddingValue=-2000, WindowCenter=0,
                 WindowWidth=2000, VOILUTFunction="LINEAR_EXACT")
    image = out(ds)
    np.testing.assert_allclose(image.pixels[0], [0.0, 0.0, 0.5, 1.0], atol=1e-7)
    assert image.padding_mask.tolist() == [[True, False, False, False]]


INVERSION_CASES = [  # (photometric, Presentation LUT Shape, inverted?)
    ("MONOCHROME2", None, False),
    ("MONOCHROME2", "IDENTITY", False),
    ("MONOCHROME1", None, True),
    ("MONOCHROME2", "INVERSE", True),
    ("MONOCHROME1", "INVERSE", True),  # DX: both say the same thing, invert once
]


@pytest.mark.parametrize("photometric,shape,inverted", INVERSION_CASES)
def test_inversion(photometric, shape, inverted):
    attrs = {"PresentationLUTShape": shape} if shape else {}
    ds = make_ds(np.array([0, 250, 500, 1000], np.uint16), photometric=photometric, WindowCenter=500,
                 WindowWidth=1000, VOILUTFunction="LINEAR_EXACT", **attrs)
    image = out(ds)
    straight = np.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(image.pixels[0], 1 - straight if inverted else straight, atol=1e-7)
    assert image.steps.count("inverted") == (1 if inverted else 0)


def test_saved_file_gives_the_same_as_the_dataset(tmp_path):
    ds = make_ds(np.array([[0, 250], [500, 1000]], np.uint16), photometric="MONOCHROME1", RescaleSlope=2,
                 RescaleIntercept=-1000, WindowCenter=0, WindowWidth=2000, VOILUTFunction="LINEAR_EXACT")
    path = tmp_path / "synthetic.dcm"
    ds.save_as(path, enforce_file_format=True)
    from_file = normalise(path)
    np.testing.assert_array_equal(from_file.pixels, out(ds).pixels)
    np.testing.assert_allclose(from_file.pixels, [[1.0, 0.75], [0.5, 0.0]], atol=1e-7)


def test_pixel_spacing_preferred_then_imager_then_none():
    base = np.zeros((2, 2), np.uint16)
    assert out(make_ds(base, PixelSpacing=[0.2, 0.3], ImagerPixelSpacing=[0.1, 0.1])).pixel_spacing_mm == (0.2, 0.3)
    assert out(make_ds(base, PixelSpacing=[0, 0], ImagerPixelSpacing=[0.1, 0.15])).pixel_spacing_mm == (0.1, 0.15)
    assert out(make_ds(base, PixelSpacing=[0, 0])).pixel_spacing_mm is None
    assert out(make_ds(base)).pixel_spacing_mm is None


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "PALETTE COLOR"])
def test_colour_is_unreadable(photometric):
    ds = make_ds(np.zeros((2, 6), np.uint8), photometric=photometric)
    ds.SamplesPerPixel = 3 if photometric != "PALETTE COLOR" else 1
    with pytest.raises(UnreadableImage, match="not grayscale"):
        normalise(ds)


def test_missing_photometric_is_unreadable():
    ds = make_ds(np.zeros((2, 2), np.uint16))
    del ds.PhotometricInterpretation
    with pytest.raises(UnreadableImage, match="missing"):
        normalise(ds)


def test_missing_pixel_data_is_unreadable():
    ds = make_ds(np.zeros((2, 2), np.uint16))
    del ds.PixelData
    with pytest.raises(UnreadableImage, match="cannot be decoded"):
        normalise(ds)


def test_dataset_without_file_meta_is_unreadable_not_attribute_error():
    # A dataset built in memory (or received without a meta header) and undecodable: still UnreadableImage.
    ds = make_ds(np.zeros((2, 2), np.uint16))
    del ds.PixelData
    del ds.file_meta
    with pytest.raises(UnreadableImage):
        normalise(ds)


def test_truncated_pixel_data_is_unreadable():
    ds = make_ds(np.zeros((4, 4), np.uint16))
    ds.PixelData = ds.PixelData[:10]
    with pytest.raises(UnreadableImage):
        normalise(ds)


def test_multi_frame_is_unreadable():
    ds = make_ds(np.zeros((2, 3, 4), np.uint16).reshape(6, 4))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 3, 4, 2
    with pytest.raises(UnreadableImage, match="multi-frame"):
        normalise(ds)


def test_non_image_file_is_unreadable(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(UnreadableImage):
        normalise(path)


# --------------------------------------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------------------------------------


def gradient(dtype, top: int, shape=(40, 64)) -> np.ndarray:
    rows, cols = shape
    return (np.add.outer(np.arange(rows) * 3, np.arange(cols) * 2) * top // (3 * (rows - 1) + 2 * (cols - 1))
            ).astype(dtype)


def test_png_8_bit(tmp_path):
    values = gradient(np.uint8, 255)
    path = tmp_path / "image.png"
    Image.fromarray(values).save(path)
    image = normalise(path)
    assert image.kind == "png" and image.steps == ["picture"] and image.pixel_spacing_mm is None
    assert image.pixels.dtype == np.float32 and image.pixels.shape == values.shape
    np.testing.assert_array_equal(image.pixels, (values / 255.0).astype(np.float32))


@pytest.mark.parametrize("top", [65535, 4095, 200])  # full range, 12-bit data, a very dark image
def test_png_16_bit(tmp_path, top):
    values = gradient(np.uint16, top)
    path = tmp_path / "image16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = normalise(path)
    assert image.kind == "png" and image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels, (values / 65535.0).astype(np.float32))


def test_png_colour_becomes_luma(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 255, 255)
    rgb[0, 1] = (100, 100, 100)
    rgb[1, 2] = (255, 0, 0)  # ITU-R 601-2 luma: 0.299 * 255 = 76.2 -> 76
    path = tmp_path / "colour.png"
    Image.fromarray(rgb).save(path)
    pixels = normalise(path).pixels
    assert pixels[0, 0] == 1.0 and pixels[0, 1] == np.float32(100 / 255) and pixels[0, 2] == 0.0
    assert abs(float(pixels[1, 2]) - 76 / 255) <= 1 / 255


def test_jpeg(tmp_path):
    values = gradient(np.uint8, 255, shape=(64, 96))
    path = tmp_path / "image.jpg"
    Image.fromarray(values).save(path, quality=95)
    image = normalise(path)
    assert image.kind == "jpeg" and image.pixels.dtype == np.float32 and image.pixels.shape == values.shape
    assert 0.0 <= float(image.pixels.min()) and float(image.pixels.max()) <= 1.0
    diff = np.abs(image.pixels - values / 255.0)
    assert float(diff.mean()) < 2 / 255 and float(diff.max()) < 8 / 255


# --------------------------------------------------------------------------------------------------------------------
# Letterbox geometry
# --------------------------------------------------------------------------------------------------------------------

SHAPES = [(1955, 1841), (1841, 1955), (512, 512), (300, 1000), (1000, 300), (17, 23)]


@pytest.mark.parametrize("shape", SHAPES)
def test_letterbox_fit(shape):
    box = Letterbox.fit(shape, 256)
    rows, cols = box.content_shape
    top, left = box.offset
    assert box.source_shape == shape and box.size == 256
    assert max(rows, cols) == 256  # the long side fills the square
    assert 0 <= top and top + rows <= 256 and 0 <= left and left + cols <= 256
    # aspect preserved within one pixel of the short side
    assert abs(rows - cols * shape[0] / shape[1]) <= 1 and abs(cols - rows * shape[1] / shape[0]) <= 1
    # centred: the two margins differ by at most one pixel
    assert abs(top - (256 - top - rows)) <= 1 and abs(left - (256 - left - cols)) <= 1
    assert box.scale == pytest.approx((rows / shape[0], cols / shape[1]))


def test_letterbox_known_values():
    box = Letterbox.fit((300, 1000), 256)
    # 300 * 0.256 = 76.8 -> 77 rows; (256 - 77) // 2 = 89
    assert box.content_shape == (77, 256) and box.offset == (89, 0)
    box = Letterbox.fit((1955, 1841), 256)
    # 1841 * 256 / 1955 = 241.07 -> 241 columns; (256 - 241) // 2 = 7
    assert box.content_shape == (256, 241) and box.offset == (0, 7)


def test_to_model_keeps_a_known_pattern_and_pads_with_zero():
    # 512 x 1024 -> 128 x 256 content in a 256 square, offset (64, 0): an exact 4x area average.
    image = np.zeros((512, 1024), np.float32)
    image[:256, :] = 1.0  # top half white
    image[256:, 512:] = 0.5  # bottom right grey
    box = Letterbox.fit(image.shape, 256)
    assert box.content_shape == (128, 256) and box.offset == (64, 0)
    small = box.to_model(image)
    assert small.shape == (256, 256) and small.dtype == np.float32
    assert not small[:64].any() and not small[192:].any()  # padding
    assert np.all(small[64:128] == 1.0)
    assert np.all(small[128:192, :128] == 0.0) and np.all(small[128:192, 128:] == 0.5)
    # area averaging: a 4x4 checkerboard block averages to its mean
    checker = (np.indices((512, 1024)).sum(axis=0) % 2).astype(np.float32)
    np.testing.assert_allclose(box.to_model(checker)[64:192], 0.5, atol=1e-6)


def test_triangle_resample_is_the_filter_the_lung_unet_was_trained_with(tmp_path):
    # The U-Net's training films were shrunk from 512 to 256 px by PIL's BILINEAR resize (train.datasets.load_gray);
    # the node's segmentation input must be made with the same filter, not the sharper area average.
    from ai.normalise import NormalisedImage
    from ai.segment import TRAINING_RESAMPLE, model_input
    from train.datasets import load_gray

    rng = np.random.default_rng(7)
    film = np.clip(ellipse((512, 512)) * 0.6 + rng.normal(0.3, 0.15, (512, 512)), 0, 1)
    png = (film * 255).round().astype(np.uint8)
    path = tmp_path / "film.png"
    Image.fromarray(png).save(path)
    trained = load_gray(path, 256)  # what training saw
    native = png.astype(np.float32) / 255
    box = Letterbox.fit(native.shape, 256)
    triangle, area = box.to_model(native, resample="triangle"), box.to_model(native)
    assert np.abs(triangle - trained).max() <= 1 / 255 + 1e-6  # PIL rounds to 8 bits
    assert np.abs(area - trained).mean() > 10 * np.abs(triangle - trained).mean()
    assert TRAINING_RESAMPLE == "triangle"
    np.testing.assert_allclose(model_input(NormalisedImage(native, None, "png", ["picture"]), 256)[0],
                               stretch_contrast(triangle), atol=1e-6)
    with pytest.raises(ValueError, match="unknown resample"):
        box.to_model(native, resample="lanczos")


def ellipse(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    r, c = np.ogrid[:rows, :cols]
    return ((r - rows * 0.45) / (rows * 0.3)) ** 2 + ((c - cols * 0.55) / (cols * 0.25)) ** 2 <= 1.0


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_letterbox_round_trip_onto_the_native_grid(shape):
    mask = ellipse(shape)
    box = Letterbox.fit(shape, 256)
    small = box.to_model(mask.astype(np.float32))
    top, left = box.offset
    content = np.zeros((256, 256), bool)
    content[top:top + box.content_shape[0], left:left + box.content_shape[1]] = True
    assert not small[~content].any()
    back = box.to_source(small)
    assert back.shape == shape
    restored = back > 0.5
    dice = 2 * np.logical_and(restored, mask).sum() / (restored.sum() + mask.sum())
    assert dice > 0.98, dice
    # and the mask is not shifted: centroids agree within a model pixel's worth of source pixels
    for axis in (0, 1):
        idx = np.indices(shape)[axis]
        assert abs(idx[restored].mean() - idx[mask].mean()) < 1.0 / box.scale[axis]
    # a torch tensor works too
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(box.to_source(torch.from_numpy(small)), back)


@pytest.mark.parametrize("shape", [(1955, 1841), (300, 1000)])
def test_to_source_maps_model_pixel_centres_onto_native_pixel_centres(shape):
    # A model map whose value is its own content coordinate (row or column index inside the content). Source pixel
    # j's centre j + 0.5 lies at (j + 0.5) * scale in the content, i.e. at content index (j + 0.5) * scale - 0.5;
    # bilinear resampling of a linear ramp must return exactly that (clamped to the first / last content pixel).
    box = Letterbox.fit(shape, 256)
    top, left = box.offset
    for axis, origin in ((0, top), (1, left)):
        ramp = (np.indices((256, 256))[axis] - origin).astype(np.float32)
        back = box.to_source(ramp)
        j = np.arange(shape[axis])
        expected = np.clip((j + 0.5) * box.content_shape[axis] / shape[axis] - 0.5, 0, box.content_shape[axis] - 1)
        profile = back[:, 0] if axis == 0 else back[0, :]
        np.testing.assert_allclose(profile, expected, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# stretch_contrast
# --------------------------------------------------------------------------------------------------------------------


def test_stretch_contrast_range_padding_and_median():
    rng = np.random.default_rng(5)
    pixels = np.zeros((256, 256), np.float32)
    valid = np.zeros_like(pixels, dtype=bool)
    valid[40:216, 10:246] = True
    pixels[valid] = (0.1 + 0.6 * rng.random(valid.sum()) ** 2).astype(np.float32)  # dark-skewed: needs a gamma
    pixels[~valid] = 0.9  # bright padding must not leak into statistics nor output
    result = stretch_contrast(pixels, valid)
    assert result.dtype == np.float32 and result.shape == pixels.shape
    assert 0.0 <= float(result.min()) and float(result.max()) <= 1.0
    assert not result[~valid].any()
    assert abs(float(np.median(result[valid])) - 0.5) < 0.01
    # the 1st / 99th percentiles of the valid pixels land on 0 and 1
    assert abs(float(np.percentile(result[valid], 1))) < 0.01
    assert abs(float(np.percentile(result[valid], 99)) - 1.0) < 0.01
    # monotone: the order of valid pixels is kept
    order = np.argsort(pixels[valid], kind="stable")
    assert np.all(np.diff(result[valid][order]) >= 0)


def test_stretch_contrast_without_mask_and_flat_image():
    rng = np.random.default_rng(6)
    pixels = rng.random((64, 64)).astype(np.float32) ** 0.5  # bright-skewed
    result = stretch_contrast(pixels)
    assert 0.0 <= float(result.min()) and float(result.max()) <= 1.0
    assert abs(float(np.median(result)) - 0.5) < 0.01
    flat = np.full((8, 8), 0.3, np.float32)
    np.testing.assert_array_equal(stretch_contrast(flat), flat)


# --------------------------------------------------------------------------------------------------------------------
# Lenient header reading (ai.header_values): real-world malformed values are read or treated as absent, never raise
# --------------------------------------------------------------------------------------------------------------------

from pydicom import config as pydicom_config  # noqa: E402
from pydicom.datadict import dictionary_VR, tag_for_keyword  # noqa: E402
from pydicom.dataelem import RawDataElement  # noqa: E402
from pydicom.tag import Tag  # noqa: E402

from ai import header_values  # noqa: E402
from ai.header_scope import header_scope  # noqa: E402


def with_raw(ds: Dataset, path=None, implicit: bool = False, **values: bytes) -> Dataset:
    """``ds`` with each keyword's value replaced by raw bytes as a file would hold them (pydicom never converted
    them); with ``path``, written to a file and read back, as the node reads what it receives."""
    for keyword, raw in values.items():
        tag = Tag(tag_for_keyword(keyword))
        ds[tag] = RawDataElement(tag, None if implicit else dictionary_VR(tag).split(" ")[0], len(raw), raw, 0,
                                 implicit, True)
    if path is None:
        return ds
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path)


def chest_header() -> Dataset:
    """The Philips chest's header with a token Pixel Data (the scope verdict only needs its presence)."""
    ds = dcmread(CHEST_UNCOMPRESSED_PATH, stop_before_pixels=True)
    ds.PixelData = b"\0" * 4
    ds["PixelData"].VR = "OW"
    return ds


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_image_type_with_a_space_for_the_backslash_is_in_scope(tmp_path, implicit):
    for raw, expected in ((b"ORIGINAL PRIMARY", ["ORIGINAL", "PRIMARY"]),
                          (b"DERIVED PRIMARY ", ["DERIVED", "PRIMARY"])):
        ds = with_raw(chest_header(), tmp_path / "h.dcm", implicit, ImageType=raw)
        assert header_values.strings(ds, "ImageType", split_spaces=True) == expected
        assert header_scope(ds).in_scope, raw
    ds = with_raw(chest_header(), tmp_path / "h.dcm", implicit, ImageType=b"DERIVED SECONDARY")
    assert header_scope(ds).reason == "not_original_image"
    ds = chest_header()
    ds.ImageType = "ORIGINAL PRIMARY"  # the same mistake in a dataset built in memory
    assert header_scope(ds).in_scope


def test_odd_case_and_padding_of_body_part_and_view(tmp_path):
    ds = with_raw(chest_header(), tmp_path / "h.dcm", BodyPartExamined=b"chest ", ViewPosition=b" PA ")
    assert (header_values.text(ds, "BodyPartExamined"), header_values.text(ds, "ViewPosition")) == ("CHEST", "PA")
    assert header_scope(ds).in_scope
    ds = chest_header()
    ds.BodyPartExamined, ds.ViewPosition = "Thorax", "ap"
    assert header_scope(ds).in_scope
    ds.ViewPosition = "lateral"
    assert header_scope(ds).reason == "view_not_frontal"


@pytest.mark.parametrize("raw, expected", [
    (b"0.14 0.14", (0.14, 0.14)),  # space for the backslash
    (b"0,139\\0,139 ", (0.139, 0.139)),  # decimal commas
    (b"0,139 0,14", (0.139, 0.14)),
    (b" 0.2\\0.25\x00", (0.2, 0.25)),
    (b"0,139", None),  # one value: malformed, absent
    (b"abc\\def", None),
    (b"0.1\\nan", None),
    (b"1,2,3\\4", None),  # more than one comma: ambiguous, absent
    (b"", None),
])
def test_pixel_spacing_read_leniently(tmp_path, raw, expected):
    ds = with_raw(make_ds(np.zeros((2, 2), np.uint16)), tmp_path / "s.dcm", PixelSpacing=raw)
    image = normalise(ds)  # never raises for a malformed optional attribute
    assert image.pixel_spacing_mm == (pytest.approx(expected) if expected else None)


def test_malformed_pixel_spacing_falls_back_to_imager_pixel_spacing(tmp_path):
    ds = with_raw(make_ds(np.zeros((2, 2), np.uint16)), tmp_path / "s.dcm", PixelSpacing=b"n/a",
                  ImagerPixelSpacing=b"0,1\\0,1")
    assert normalise(ds).pixel_spacing_mm == pytest.approx((0.1, 0.1))


def test_decimal_values_with_commas_and_spaces():
    ds = with_raw(Dataset(), WindowCenter=b"0,139", WindowWidth=b"1000 2000", RescaleSlope=b"+1,5E1 ",
                  RescaleIntercept=b"-1024\x00", PixelSpacing=b"0,139\\0,139")
    assert header_values.decimal(ds, "WindowCenter") == pytest.approx(0.139)
    assert header_values.decimals(ds, "WindowWidth") == [1000.0, 2000.0]
    assert header_values.decimal(ds, "RescaleSlope") == pytest.approx(15.0)
    assert header_values.integer(ds, "RescaleIntercept") == -1024
    assert header_values.decimals(ds, "PixelSpacing") == pytest.approx([0.139, 0.139])
    assert header_values.decimal(ds, "PixelSpacing") == pytest.approx(0.139)


def test_window_with_spaces_and_commas_is_used(tmp_path):
    pixels = np.array([[0, 250], [500, 1000]], np.uint16)
    # "500 9999" is two windows written with a space: the first (centre 500, width 1000) is used.
    ds = with_raw(make_ds(pixels), tmp_path / "w.dcm", WindowCenter=b"500 9999", WindowWidth=b"1000,0\\1",
                  VOILUTFunction=b"linear_exact ")
    image = normalise(ds)
    assert image.steps == ["window_linear_exact"]
    np.testing.assert_allclose(image.pixels, [[0.0, 0.25], [0.5, 1.0]], atol=1e-7)


@pytest.mark.parametrize("keyword, raw", [
    ("WindowCenter", b"auto"), ("WindowWidth", b"-"), ("RescaleSlope", b"one"), ("RescaleIntercept", b"1e999"),
    ("NumberOfFrames", b"x1"), ("PixelPaddingValue", b"\x01\x00\x02"), ("PresentationLUTShape", b"\xff\xfe"),
    ("VOILUTFunction", b"\x00\x00"),
])
def test_malformed_optional_attributes_are_absent_never_errors(tmp_path, keyword, raw):
    pixels = np.array([[0, 250], [500, 1000]], np.uint16)
    plain = normalise(make_ds(pixels, WindowCenter=500, WindowWidth=1000))
    attrs = {} if keyword in ("WindowCenter", "WindowWidth") else {"WindowCenter": 500, "WindowWidth": 1000}
    # A binary value of the wrong length cannot even be written by pydicom: that one stays in memory, raw.
    path = None if keyword == "PixelPaddingValue" else tmp_path / "m.dcm"
    ds = with_raw(make_ds(pixels, **attrs), path, **{keyword: raw})
    image = normalise(ds)
    if keyword in ("WindowCenter", "WindowWidth"):
        assert image.steps == ["percentile_window"]  # no usable window: as if there were none
    else:
        np.testing.assert_array_equal(image.pixels, plain.pixels)
    scope_ds = with_raw(chest_header(), path and tmp_path / "h.dcm", **{keyword: raw})
    assert header_scope(scope_ds).in_scope


def test_values_pydicom_refuses_to_convert_are_read_from_the_raw_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.RAISE)
    ds = with_raw(chest_header(), tmp_path / "h.dcm", NumberOfFrames=b"one", ImageType=b"original primary",
                  PixelSpacing=b"0,139\\0,139")
    with pytest.raises(ValueError):
        _ = ds.NumberOfFrames  # pydicom itself gives up on it
    assert header_values.integer(ds, "NumberOfFrames") is None
    assert header_values.strings(ds, "ImageType", split_spaces=True) == ["ORIGINAL", "PRIMARY"]
    assert header_values.decimals(ds, "PixelSpacing") == pytest.approx([0.139, 0.139])
    assert header_scope(ds).in_scope


def test_absent_attributes_and_unknown_keywords():
    ds = Dataset()
    assert header_values.text(ds, "BodyPartExamined") == "" and header_values.strings(ds, "ImageType") == []
    assert header_values.decimals(ds, "PixelSpacing") is None and header_values.integer(ds, "Rows") is None
    assert header_values.raw_values(ds, "NoSuchKeyword") == []


def test_unreadable_image_messages_are_log_safe_constants():
    from ai.safe_text import exception_summary

    ds = make_ds(np.zeros((2, 2), np.uint16), photometric="YBR_FULL")
    with pytest.raises(UnreadableImage) as caught:
        normalise(ds)
    assert "YBR" not in str(caught.value) and caught.value.reason == "not_monochrome"
    assert exception_summary(caught.value) == "UnreadableImage: photometric interpretation is not grayscale"


# --- the lookup-table path against the per-pixel computation ------------------------------------------------------

def _table_variants(rng: np.random.Generator):
    """Generated headers over the classes the vendors write: every VOI kind, rescale, LUT sequences, padding,
    inversion, signed and unsigned, narrow and full 16-bit ranges."""
    voi = [{}, {"WindowCenter": 1800, "WindowWidth": 3000}, {"WindowCenter": 900, "WindowWidth": 1},
           {"WindowCenter": 1200, "WindowWidth": 2400, "VOILUTFunction": "SIGMOID"},
           {"WindowCenter": 1000, "WindowWidth": 1500, "VOILUTFunction": "LINEAR_EXACT"},
           {"VOILUTSequence": [lut_item([4096, 0, 12], list(range(0, 4096)))]},
           {"VOILUTSequence": [lut_item([256, 100, 20], [i * 4000 for i in range(256)])]}]
    modality = [{}, {"RescaleSlope": 0.5, "RescaleIntercept": -1024},
                {"ModalityLUTSequence": [lut_item([2048, 0, 16], [(i * 7) % 4096 for i in range(2048)])]}]
    for k in range(24):
        signed = k % 4 == 3
        high = int(rng.choice([255, 4095, 65535 if not signed else 32767]))
        array = rng.integers(-high // 2 if signed else 0, high, size=(37, 53)).astype(np.int16 if signed else np.uint16)
        array[:3] = array.min()  # a collimator border
        attrs = {**voi[k % len(voi)], **modality[k % len(modality)]}
        if k % 5 == 0:
            attrs["PixelPaddingValue"] = int(array[0, 0])
        if k % 7 == 0:
            attrs["PresentationLUTShape"] = "INVERSE"
        yield make_ds(array, photometric="MONOCHROME1" if k % 2 else "MONOCHROME2", **attrs), array
    flat = np.full((8, 8), 700, np.uint16)  # nothing but padding: the percentile window of no valid pixel
    yield make_ds(flat, PixelPaddingValue=700, RescaleSlope=2), flat


def test_the_lookup_table_gives_the_per_pixel_result_bit_for_bit():
    from ai.normalise import _padding_mask, _pixelwise

    for ds, stored in _table_variants(np.random.default_rng(7)):
        image = normalise(ds)
        padding = _padding_mask(ds, stored)
        invert = ds.PhotometricInterpretation == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE"
        expected = _pixelwise(ds, stored, padding, invert, [])
        if padding is not None:
            expected[padding] = 0.0
        assert image.pixels.dtype == np.float32
        assert np.array_equal(image.pixels, expected), sorted(k for k in ds.dir() if "LUT" in k or "Window" in k)
