"""Every accepted transfer syntax arrives unchanged and decodes with the installed non-GPL plugins.

One node serves the whole module. Each case sends one file in its own transfer syntax with the storescu flag that
proposes that syntax, then checks the archived copy: the same transfer syntax and the same dataset bytes as storescu
put on the wire (nothing was transcoded in transit), and pixels that decode with every installed pydicom plugin for
that syntax and match the uncompressed source (exactly if lossless, within a bound if lossy).

Inputs: the real Philips CR chest sample in its four stored syntaxes (uncompressed, JPEG 2000 lossless and lossy,
JPEG-LS near-lossless) and, for the other syntaxes, a 512x512 crop of it transcoded here with DCMTK.
See docs/transfer-syntaxes.md for which plugin decodes which syntax.
"""

from __future__ import annotations

import importlib.util
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import generate_uid

from ai.normalise import decode_pixels
from dicom_node.scp import TRANSFER_SYNTAXES

from .dicomgen import UID_ROOT, write_pixel_source
from .support.data import CHEST_DIR as CHEST
from .support.data import CHEST_UNCOMPRESSED as UNCOMPRESSED
from .support.dicom_files import dataset_bytes
from .support.dicom_tools import PEER_ENV, dcmtk_wire_encoding, require_tool, storescu
from .support.net import free_port
from .support.node import Node

pytestmark = pytest.mark.slow

CROP = 512

# Plugins pydicom may use here; every one is under a permissive licence (GPL pylibjpeg-libjpeg must stay out).
ALLOWED_PLUGINS = {"gdcm", "pylibjpeg", "pyjpegls", "pillow", "pydicom"}

# storescu proposes only uncompressed syntaxes unless told. No flag proposes JPEG Lossless Process 14 with a
# predictor other than 1 (-xs is SV1), so that one goes through an association profile (-xf).
STORESCU_PROFILE = """\
[[TransferSyntaxes]]
[Process14]
TransferSyntax1 = 1.2.840.10008.1.2.4.57

[[PresentationContexts]]
[Process14]
PresentationContext1 = {sop_class}\\Process14

[[Profiles]]
[Process14]
PresentationContexts = Process14
"""


@dataclass(frozen=True)
class Case:
    uid: str
    make: str  # how the file to send is produced: "sample:<file>" or "<source>:<DCMTK tool and options>"
    flags: tuple[str, ...]  # storescu options that propose this syntax
    plugins: tuple[str, ...]  # decoders expected for it; the first one is pydicom's default choice
    sof: int | None = None  # expected JPEG / JPEG-LS start-of-frame marker and sample precision
    precision: int | None = None
    lossless: bool = True
    pydicom_decodes: bool = True  # False: pydicom's plugins refuse it, python-gdcm is called directly


CASES = {
    "explicit-vr-little-endian": Case("1.2.840.10008.1.2.1", "src16:", ("-xe",), ()),
    "implicit-vr-little-endian": Case("1.2.840.10008.1.2", "src16:dcmconv +ti", ("-xi",), ()),
    "deflated-explicit-vr-little-endian": Case("1.2.840.10008.1.2.1.99", "src16:dcmconv +td", ("-xd",), ()),
    "explicit-vr-big-endian": Case("1.2.840.10008.1.2.2", "src16:dcmconv +tb", ("-xb",), ()),
    "jpeg-baseline": Case("1.2.840.10008.1.2.4.50", "src8:dcmcjpeg +eb +sr", ("-xy",), ("gdcm", "pillow"),
                          sof=0xC0, precision=8, lossless=False),
    "jpeg-extended-8bit": Case("1.2.840.10008.1.2.4.51", "src8:dcmcjpeg +ee +sr", ("-xx",), ("gdcm", "pillow"),
                               sof=0xC1, precision=8, lossless=False),
    # pydicom refuses 12-bit JPEG Extended with every installed plugin; python-gdcm decodes it when called directly.
    "jpeg-extended-12bit": Case("1.2.840.10008.1.2.4.51", "src12:dcmcjpeg +ee +sr", ("-xx",), ("gdcm", "pillow"),
                                sof=0xC1, precision=12, lossless=False, pydicom_decodes=False),
    "jpeg-lossless-process14": Case("1.2.840.10008.1.2.4.57", "src16:dcmcjpeg +el +sv 6",
                                    ("-xf", "{profile}", "Process14"), ("gdcm",), sof=0xC3, precision=16),
    "jpeg-lossless-sv1": Case("1.2.840.10008.1.2.4.70", "src16:dcmcjpeg +e1", ("-xs",), ("gdcm",),
                              sof=0xC3, precision=16),
    "jpeg-ls-lossless": Case("1.2.840.10008.1.2.4.80", "src16:dcmcjpls +el", ("-xt",), ("gdcm", "pyjpegls"),
                             sof=0xF7, precision=16),
    "jpeg-ls-near-lossless": Case("1.2.840.10008.1.2.4.81",
                                  "sample:RG1_JLSN_Philips_CR_chest_JPEGLS_near_lossless.dcm", ("-xu",),
                                  ("gdcm", "pyjpegls"), sof=0xF7, precision=15, lossless=False),
    "jpeg2000-lossless": Case("1.2.840.10008.1.2.4.90", "sample:RG1_J2KR.dcm", ("-xv",),
                              ("gdcm", "pillow", "pylibjpeg")),
    "jpeg2000-lossy": Case("1.2.840.10008.1.2.4.91", "sample:RG1_J2KI.dcm", ("-xw",),
                           ("gdcm", "pillow", "pylibjpeg"), lossless=False),
    "rle-lossless": Case("1.2.840.10008.1.2.5", "src16:dcmcrle", ("-xr",), ("pydicom", "pylibjpeg")),
}


def test_cases_cover_every_accepted_transfer_syntax():
    assert {case.uid for case in CASES.values()} == set(TRANSFER_SYNTAXES)


def test_no_gpl_jpeg_plugin_installed():
    """pylibjpeg-libjpeg (GPLv3) must not be installed: JPEG and JPEG-LS decode through GDCM instead."""
    assert importlib.util.find_spec("libjpeg") is None
    from pylibjpeg.utils import get_pixel_data_decoders

    # pylibjpeg itself only brings the OpenJPEG (JPEG 2000) and RLE backends.
    backends = {uid: func.__module__.split(".")[0] for uid, func in get_pixel_data_decoders().items()}
    assert {backends.get(uid) for uid in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")} == {"openjpeg"}
    assert backends.get("1.2.840.10008.1.2.5") == "rle"
    assert not set(backends) & {case.uid for case in CASES.values() if case.sof is not None}
    for uid in TRANSFER_SYNTAXES:
        assert set(get_decoder(uid).available_plugins) <= ALLOWED_PLUGINS, uid


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Prepared:
    path: Path  # the file storescu sends
    reference: np.ndarray  # uncompressed pixels of the source it was made from


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Prepared]:
    for tool in ("storescu", "dcmconv", "dcmcjpeg", "dcmcjpls", "dcmcrle"):
        require_tool(tool)
    work = tmp_path_factory.mktemp("transfer-syntaxes")
    full = dcmread(UNCOMPRESSED).pixel_array  # 1955x1841, 15 bits stored, MONOCHROME1
    top, left = (full.shape[0] - CROP) // 2, (full.shape[1] - CROP) // 2
    crop = np.ascontiguousarray(full[top:top + CROP, left:left + CROP])
    sources = {  # (pixels, bits stored): 15-bit as acquired, 12-bit for JPEG extended, 8-bit for JPEG baseline
        "src16": (crop, 15),
        "src12": (crop >> 3, 12),
        "src8": ((255 - (crop >> 7)).astype(np.uint8), 8),  # inverted: MONOCHROME2
    }
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    out: dict[str, Prepared] = {}
    for case_id, case in CASES.items():
        source, _, command = case.make.partition(":")
        if source == "sample":
            out[case_id] = Prepared(CHEST / command, full)
            continue
        pixels, bits = sources[source]
        # A fresh SOP Instance UID per case: all go to the same node, whose duplicate policy is "reject".
        src = write_pixel_source(UNCOMPRESSED, pixels, bits, work / f"{case_id}-source.dcm", study, series)
        sent = src
        if command:
            sent = work / f"{case_id}.dcm"
            subprocess.run([*command.split(), str(src), str(sent)], check=True, capture_output=True, env=PEER_ENV,
                           timeout=60)
        out[case_id] = Prepared(sent, dcmread(src).pixel_array)
    return out


@pytest.fixture(scope="module")
def scp(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer-syntax-node")
    node = Node(root=root, port=free_port()).start()
    yield node
    node.kill()


# ---------------------------------------------------------------------------------------------------- checks


def _codestream_header(frame: bytes) -> tuple[int, int, int]:
    """(SOF marker, sample precision, first scan parameter) of a JPEG or JPEG-LS codestream.

    The scan parameter is the predictor selection value for lossless JPEG and NEAR for JPEG-LS.
    """
    assert frame[:2] == b"\xff\xd8", "no SOI marker"
    sof = precision = None
    pos = 2
    while pos < len(frame):
        assert frame[pos] == 0xFF, f"no marker at offset {pos}"
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(frame[pos + 2:pos + 4], "big")
        segment = frame[pos + 4:pos + 2 + length]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            sof, precision = marker, segment[0]
        elif marker == 0xDA:  # SOS: Ns, Ns x (component, table), then Ss (JPEG) / NEAR (JPEG-LS)
            assert sof is not None, "scan before frame header"
            return sof, precision, segment[1 + 2 * segment[0]]
        pos += 2 + length
    raise AssertionError("no SOS marker")


def _check_pixels(case_id: str, case: Case, decoded: np.ndarray, reference: np.ndarray, bits: int,
                  near: int | None) -> None:
    assert decoded.shape == reference.shape
    if case.lossless:
        np.testing.assert_array_equal(decoded, reference)
        return
    error = np.abs(decoded.astype(np.int64) - reference.astype(np.int64))
    if near is not None:  # JPEG-LS near-lossless: the codestream's NEAR bounds every pixel's error
        assert error.max() <= near, f"{case_id}: max error {error.max()} > NEAR {near}"
        return
    full_scale = 2 ** bits
    # Measured (mean / max error, % of full scale): JPEG q90 8-bit 0.3 / 2.3, 12-bit 0.07 / 0.5; J2K 10:1 0.15 / 1.2.
    assert error.mean() <= 0.01 * full_scale, f"{case_id}: mean error {error.mean():.1f} of {full_scale}"
    assert error.max() <= 0.05 * full_scale, f"{case_id}: max error {error.max()} of {full_scale}"
    assert error.any(), f"{case_id}: lossy syntax decoded without any loss: wrong reference?"


@pytest.mark.parametrize("case_id", [pytest.param(case_id, id=case_id) for case_id in CASES])
def test_received_file_keeps_its_syntax_and_decodes(case_id, prepared, scp, tmp_path):
    case, item = CASES[case_id], prepared[case_id]
    sent = dcmread(item.path, stop_before_pixels=True)
    assert sent.file_meta.TransferSyntaxUID == case.uid, "input was not produced in the expected syntax"

    flags = list(case.flags)
    if "{profile}" in flags:
        profile = tmp_path / "storescu-process14.cfg"
        profile.write_text(STORESCU_PROFILE.format(sop_class=sent.SOPClassUID))
        flags[flags.index("{profile}")] = str(profile)
    result = storescu(scp.port, [item.path], *flags)
    assert result.statuses == [(str(item.path), "Success")], result.output[-2000:] + scp.log()[-2000:]

    archived = scp.storage_root / "archive" / sent.StudyInstanceUID / sent.SeriesInstanceUID / \
        f"{sent.SOPInstanceUID}.dcm"
    assert archived.is_file(), f"not archived at {archived}"
    ds = dcmread(archived)
    assert ds.file_meta.TransferSyntaxUID == case.uid, "transcoded in transit"
    # storescu sends the file as DCMTK encodes it (explicit item lengths, no trailing padding): compare with that.
    wire = dataset_bytes(dcmtk_wire_encoding(item.path, tmp_path / "wire.dcm"))
    if case.uid == "1.2.840.10008.1.2.1.99" and len(wire) % 2:
        wire += b"\0"  # on the network storescu pads an odd-length deflate stream with one zero byte; dcmconv doesn't
    assert dataset_bytes(archived) == wire, "dataset changed in transit"

    near = None
    if case.sof is not None:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        sof, precision, scan_parameter = _codestream_header(frame)
        assert (sof, precision) == (case.sof, case.precision)
        if case.uid == "1.2.840.10008.1.2.4.57":
            assert scan_parameter != 1, "Process 14 case should use a predictor other than SV1"
        elif case.uid == "1.2.840.10008.1.2.4.70":
            assert scan_parameter == 1
        elif case.sof == 0xF7:
            near = scan_parameter
            assert (near == 0) == case.lossless

    bits = int(ds.BitsStored)
    decoder = get_decoder(case.uid)
    assert decoder.available_plugins == case.plugins, decoder.missing_dependencies
    # The node's own decoder (ai.normalise.decode_pixels) handles every case, the 12-bit JPEG Extended one included.
    _check_pixels(f"{case_id} via the node's decoder", case, decode_pixels(dcmread(archived)), item.reference, bits,
                  near)
    if not case.pydicom_decodes:  # see test_pydicom_decodes_12bit_jpeg_extended
        return
    # pydicom's default choice (the first plugin that succeeds), then every installed plugin explicitly.
    _check_pixels(case_id, case, ds.pixel_array, item.reference, bits, near)
    for plugin in case.plugins:
        decoded = pixel_array(archived, decoding_plugin=plugin)
        _check_pixels(f"{case_id} via {plugin}", case, decoded, item.reference, bits, near)


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="pydicom 3 refuses 12-bit JPEG Extended in its gdcm plugin (pillow cannot do 12-bit and "
                          "pylibjpeg-libjpeg is GPL); python-gdcm itself decodes it, see ai.normalise.decode_pixels. "
                          "When this passes, drop the workaround and decode that case through pydicom like the others.")
def test_pydicom_decodes_12bit_jpeg_extended(prepared):
    _ = dcmread(prepared["jpeg-extended-12bit"].path).pixel_array
