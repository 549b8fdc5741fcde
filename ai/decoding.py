"""Pixel decoding that a broken codestream cannot crash: native syntaxes in-process, compressed ones in a child.

Some decoders do not fail cleanly on a malformed codestream: python-gdcm aborts the whole process (``abort()``,
exit status -6) on a JPEG 2000 stream that starts with SOC and the SIZ marker followed by garbage, and
pylibjpeg-rle raises a Rust panic that is not an ``Exception``. A decoder that aborts must cost only its own image,
so every compressed transfer syntax is decoded in a **decoder process**: one persistent child per analysis
process, started on the first compressed image (``subprocess`` running ``python -m ai.decoding``: no fork of a
parent that has torch and its threads loaded, and no re-import of the parent's main module; the child imports
only pydicom, numpy and the decoders). It is sent the minimal dataset (the transfer syntax, the SOP Class UID,
the Image Pixel module attributes and the encapsulated Pixel Data bytes) and returns the decoded array.

- the child dies while decoding (abort, segfault, killed): :class:`DecoderCrashed` (``decoder_crashed``); the next
  image starts a new child;
- the decode takes longer than ``timeout`` seconds (default :data:`DECODE_TIMEOUT`): the child is killed,
  :class:`DecoderTimeout` (``decoder_timeout``);
- every decoder for the syntax fails cleanly: :class:`UndecodablePixels` (``undecodable_pixels``);
- the child cannot even start (an installation problem, not the image's): :class:`DecoderUnavailable`
  (``decoder_unavailable``, the only retryable one).

The child never outlives its parent: it asks the kernel for SIGKILL when its parent dies (Linux
``PR_SET_PDEATHSIG``), exits on end-of-file of its request pipe and when its parent's pid changes, and the
parent shuts it down at exit (``atexit``). Native (uncompressed) syntaxes decode in-process: pydicom's native
decoder is numpy only, with no crash risk, and copying the pixels to a child would only cost time.

Which decoder plugins are tried, in which order, for each syntax: :data:`PLUGIN_ORDER`, documented with the reasons
in docs/transfer-syntaxes.md. Exception texts of pydicom and the decoders never leave the child (they can quote
values); only the exception type names do.
"""

from __future__ import annotations

import atexit
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from . import header_values
from .safe_text import SafeMessage

DECODE_TIMEOUT = 60.0
"""Seconds one compressed image may take to decode before its decoder process is killed (``decoder_timeout``)."""
START_TIMEOUT = 60.0
"""Seconds the decoder process may take to start (import pydicom and the decoders) before it is given up."""

# --------------------------------------------------------------------------------------------------- exceptions


class UnreadableImage(SafeMessage, ValueError):
    """The file or dataset cannot be turned into an image (not an image, no pixel data, undecodable, wrong shape).

    ``reason`` is a short snake_case code for records and reports; ``retryable`` says whether trying the same input
    again later could succeed. Messages are built from constants only (never a header value or a library text)."""

    reason = "unreadable_image"
    retryable = False

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class UndecodablePixels(UnreadableImage):
    """Every decoder for the transfer syntax refused the Pixel Data (corrupt, truncated, unsupported)."""

    reason = "undecodable_pixels"


class DecoderCrashed(UnreadableImage):
    """The decoder process died while decoding this image (abort, segfault); it is restarted for the next one.

    A child killed by SIGKILL (the OOM killer, an operator: not necessarily the image's fault) is given one more
    try with the same image in a fresh child first."""

    reason = "decoder_crashed"
    killed = False  # died of SIGKILL


class DecoderTimeout(UnreadableImage):
    """The decode took longer than its timeout; the decoder process was killed."""

    reason = "decoder_timeout"


class DecoderUnavailable(UnreadableImage):
    """The decoder process could not be started: an installation or resource problem, not the image's."""

    reason = "decoder_unavailable"
    retryable = True


# --------------------------------------------------------------------------------------------------- plugin order

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

NATIVE_SYNTAXES = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
                             EXPLICIT_VR_BIG_ENDIAN})
"""Decoded in-process by pydicom's native (numpy) decoder; a deflated dataset is already inflated when read."""

NATIVE = "pydicom-native"
GDCM_READER = "gdcm-reader"
"""python-gdcm's own ``gdcm.ImageReader``, for 12-bit JPEG Extended that pydicom's gdcm plugin refuses."""

PLUGIN_ORDER: dict[str, tuple[str, ...]] = {
    # gdcm rejects more corrupt JPEG streams than Pillow does (Pillow returns an image for some garbage); Pillow
    # is the fallback for 8-bit.
    JPEG_BASELINE: ("gdcm", "pillow"),
    JPEG_EXTENDED: ("gdcm", "pillow"),  # 8-bit; for more bits see plugin_order()
    JPEG_LOSSLESS: ("gdcm",),  # the only non-GPL decoder
    JPEG_LOSSLESS_SV1: ("gdcm",),
    # gdcm (CharLS inside) first, as pydicom's default order; pyjpegls (CharLS 2) is the fallback. Both fail cleanly.
    JPEG_LS_LOSSLESS: ("gdcm", "pyjpegls"),
    JPEG_LS_NEAR_LOSSLESS: ("gdcm", "pyjpegls"),
    # pylibjpeg-openjpeg raises a clean exception where gdcm aborts the process, and is faster; gdcm stays as the
    # fallback (its workarounds for padded and zero-Psot streams), safe only because it runs in the child.
    JPEG_2000_LOSSLESS: ("pylibjpeg", "gdcm"),
    JPEG_2000: ("pylibjpeg", "gdcm"),
    # pylibjpeg-rle (Rust) is fast and rejects malformed segments that pydicom's own decoder turns into a garbage
    # image; pydicom's native RLE decoder is the fallback.
    RLE_LOSSLESS: ("pylibjpeg", "pydicom"),
}


def plugin_order(transfer_syntax: str, bits_stored: int | None) -> tuple[str, ...]:
    """The decoders tried for this syntax, first to last (empty for native syntaxes and unknown ones)."""
    if transfer_syntax == JPEG_EXTENDED and (bits_stored or 8) > 8:
        # pydicom's gdcm plugin refuses 12-bit JPEG Extended, Pillow cannot decode it and the only other pydicom
        # plugin would be the GPL pylibjpeg-libjpeg: python-gdcm's own reader decodes it (identical to dcmdjpeg).
        return (GDCM_READER,)
    return PLUGIN_ORDER.get(transfer_syntax, ())


# --------------------------------------------------------------------------------------------------- public API

IMAGE_PIXEL_KEYWORDS = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                        "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames")


@dataclass
class Decoded:
    array: np.ndarray
    plugin: str  # which decoder produced it (pydicom plugin name, "pydicom-native" or "gdcm-reader")
    isolated: bool  # True: decoded in the decoder process
    failed: list[tuple[str, str]] = field(default_factory=list)  # (plugin, exception type) tried before it
    decoder_seconds: float | None = None  # time the successful decode took inside the decoder process


def transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    try:
        return str(meta.get("TransferSyntaxUID", "") or "").strip(" \x00") if meta is not None else ""
    except Exception:
        return ""


def decode(ds: Dataset, timeout: float = DECODE_TIMEOUT) -> Decoded:
    """Stored pixel values of ``ds`` as pydicom returns them (frames first when several).

    Only the Image Pixel module is used, read leniently (a malformed optional attribute such as Number of Frames
    ``x1`` is treated as absent). Raises :class:`UnreadableImage` or one of its subclasses, never anything else."""
    if "PixelData" not in ds:
        raise UnreadableImage("pixel data missing: cannot be decoded", reason="no_pixel_data")
    syntax = transfer_syntax(ds)
    if not syntax:
        raise UndecodablePixels("pixel data cannot be decoded (no transfer syntax)")
    attrs = image_pixel_attributes(ds)
    if syntax in NATIVE_SYNTAXES:
        return _decode_native(ds, syntax, attrs)
    order = plugin_order(syntax, header_values.integer(ds, "BitsStored"))
    if not order:
        raise UndecodablePixels("pixel data cannot be decoded (transfer syntax not supported)")
    try:
        pixel_data = ds.PixelData
    except Exception:
        raise UndecodablePixels("pixel data cannot be read") from None
    if not isinstance(pixel_data, (bytes, bytearray, memoryview)):
        raise UndecodablePixels("pixel data cannot be read")
    header = {"op": "decode", "syntax": syntax, "plugins": list(order), "attrs": attrs,
              "sop_class": header_values.uid(ds, "SOPClassUID")}
    return decoder_process().decode(header, pixel_data, timeout)


def image_pixel_attributes(ds: Dataset) -> dict[str, int | str]:
    """The Image Pixel module attributes a decoder needs, read leniently; malformed ones are left out."""
    attrs: dict[str, int | str] = {}
    for keyword in IMAGE_PIXEL_KEYWORDS:
        if keyword == "PhotometricInterpretation":
            value: int | str | None = header_values.text(ds, keyword) or None
        else:
            value = header_values.integer(ds, keyword)
        if value is not None:
            attrs[keyword] = value
    return attrs


def minimal_dataset(syntax: str, attrs: dict[str, Any], pixel_data: Any, sop_class: str = "") -> Dataset:
    """A dataset holding only what decoding needs: file meta, SOP Class, Image Pixel module and Pixel Data.

    ``pixel_data`` is a Pixel Data element (kept as it is, VR included) or the encapsulated bytes."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID(sop_class or "1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    if isinstance(pixel_data, DataElement):
        ds[0x7FE00010] = pixel_data
    else:
        ds.PixelData = bytes(pixel_data)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return ds


def _decode_native(ds: Dataset, syntax: str, attrs: dict[str, Any]) -> Decoded:
    from pydicom.pixels import pixel_array

    try:
        view = minimal_dataset(syntax, attrs, ds["PixelData"])  # the same Pixel Data element: no copy
        array = pixel_array(view)
    except Exception as exc:  # truncated or inconsistent Pixel Data: pydicom raises ValueError and friends
        raise UndecodablePixels(f"pixel data cannot be decoded (native: {type(exc).__name__})") from None
    return Decoded(array, NATIVE, isolated=False)


# --------------------------------------------------------------------------------------------------- framing
# One message: <u64 header length><pickled header dict><u64 payload length><payload bytes>.

_LENGTH = struct.Struct("<Q")


class _Timeout(Exception):
    pass


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _send(fd: int, header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    body = memoryview(payload).cast("B")
    _write_all(fd, _LENGTH.pack(len(head)) + head + _LENGTH.pack(body.nbytes))
    if body.nbytes:
        _write_all(fd, body)


def _read_exact(fd: int, size: int, deadline: float | None) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    poller = None
    if deadline is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    done = 0
    while done < size:
        if poller is not None:
            remaining = deadline - time.monotonic()  # type: ignore[operator]
            if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000))):
                if time.monotonic() >= deadline:  # type: ignore[operator]
                    raise _Timeout()
                continue
        count = os.readv(fd, [view[done:]])
        if count == 0:
            raise EOFError()
        done += count
    return buffer


def _receive(fd: int, deadline: float | None) -> tuple[dict[str, Any], bytearray]:
    (head_size,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size, deadline))
    header = pickle.loads(_read_exact(fd, head_size, deadline))
    (body_size,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size, deadline))
    body = _read_exact(fd, body_size, deadline) if body_size else bytearray()
    return header, body


# --------------------------------------------------------------------------------------------------- parent side


def _exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class DecoderProcess:
    """One decoder child and the pipes to it; restarted on demand after a crash or a timeout. Thread-safe."""

    def __init__(self, start_timeout: float = START_TIMEOUT, stderr: int | None = subprocess.DEVNULL) -> None:
        """``stderr``: where the child's standard error (and output) goes. Discarded by default: decoders print
        multi-line texts there (GDCM's "terminate called ...", Rust panic backtraces) that must not reach the node's
        one-line, escaped log; pass None to inherit it while debugging."""
        self.start_timeout = start_timeout
        self.stderr = stderr
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self.starts = 0  # how many children were started (tests, diagnostics)

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the child now (it is otherwise started by the first decode)."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._owner != os.getpid():  # this object was inherited through a fork: the child is not ours
            self._proc, self._owner = None, os.getpid()
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._discard()
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: only ask for it from the main
            # thread (whose end is the process's); a child started from another thread relies on its watchdog.
            death_signal = "pdeathsig" if threading.current_thread() is threading.main_thread() else "watchdog"
            proc = subprocess.Popen([sys.executable, "-m", "ai.decoding", str(os.getpid()), death_signal],
                                    stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=self.stderr, env=env, close_fds=True)
        except OSError:
            raise DecoderUnavailable("the decoder process cannot be started") from None
        self._proc = proc
        self.starts += 1
        assert proc.stdin is not None and proc.stdout is not None
        try:
            header, _ = _receive(proc.stdout.fileno(), time.monotonic() + self.start_timeout)
        except (_Timeout, EOFError, OSError, pickle.UnpicklingError):
            self._discard()
            raise DecoderUnavailable("the decoder process did not start") from None
        if header.get("op") != "ready":
            self._discard()
            raise DecoderUnavailable("the decoder process did not start")
        return proc

    def _discard(self) -> None:
        """Kill and reap the child (if any); the next request starts a new one."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed process does not linger
            pass

    def close(self, grace: float = 2.0) -> None:
        """Clean shutdown: end-of-file on the request pipe makes the child exit; killed if it does not."""
        with self._lock:
            proc = self._proc
            if proc is None or self._owner != os.getpid():
                self._proc = None
                return
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout=grace)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._discard()

    # -- requests
    def _call(self, header: dict[str, Any], payload: bytes | bytearray | memoryview, timeout: float
              ) -> tuple[dict[str, Any], bytearray]:
        proc = self._ensure_started()
        assert proc.stdin is not None and proc.stdout is not None
        deadline = time.monotonic() + timeout
        try:
            _send(proc.stdin.fileno(), header, payload)
            return _receive(proc.stdout.fileno(), deadline)
        except _Timeout:
            self._discard()
            raise DecoderTimeout(f"pixel data decoding took longer than {float(timeout):g} s; decoder killed") \
                from None
        except (EOFError, OSError, pickle.UnpicklingError):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            returncode = proc.poll()
            self._discard()
            crashed = DecoderCrashed(f"the decoder process died while decoding this image "
                                     f"({_exit_description(returncode)})")
            crashed.killed = returncode == -9  # SIGKILL
            raise crashed from None

    def decode(self, header: dict[str, Any], payload: bytes | bytearray | memoryview,
               timeout: float = DECODE_TIMEOUT) -> Decoded:
        with self._lock:
            try:
                reply, body = self._call(header, payload, timeout)
            except DecoderCrashed as exc:
                # Killed from outside (the OOM killer, an operator), not by a decoder fault: that may not be the
                # image's doing, so it gets one more try in a fresh child before it is called a crash.
                if not exc.killed:
                    raise
                reply, body = self._call(header, payload, timeout)
        failed = [(str(p), str(t)) for p, t in reply.get("failed", [])]
        if not reply.get("ok"):
            tried = "; ".join(f"{p}: {t}" for p, t in failed) or "no decoder"
            raise UndecodablePixels(f"pixel data cannot be decoded ({tried})")
        array = np.frombuffer(body, dtype=np.dtype(reply["dtype"])).reshape(reply["shape"])
        return Decoded(array, str(reply["plugin"]), isolated=True, failed=failed,
                       decoder_seconds=float(reply.get("seconds", 0.0)))

    def loaded_modules(self, timeout: float = 30.0) -> list[str]:
        """The top-level modules the child has imported (to check that it has no torch, say)."""
        with self._lock:
            reply, _ = self._call({"op": "modules"}, b"", timeout)
        return list(reply["modules"])


_PROCESS: DecoderProcess | None = None
_PROCESS_LOCK = threading.Lock()


def decoder_process() -> DecoderProcess:
    """This process's decoder child (one per analysis process), created on first use."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None:
            _PROCESS = DecoderProcess()
            atexit.register(_PROCESS.close)
        return _PROCESS


# --------------------------------------------------------------------------------------------------- child side


def _die_with_parent(parent: int, death_signal: bool) -> None:
    """SIGKILL when the parent dies (Linux), and a watchdog for the case the kernel cannot help."""
    if death_signal and sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - best effort
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _decode_with_gdcm_reader(ds: Dataset) -> np.ndarray:
    import tempfile

    import gdcm  # python-gdcm, BSD

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.dcm")
        ds.save_as(path, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(path)
        if not reader.Read():
            raise ValueError("GDCM cannot read the image")
        image = reader.GetImage()
        pixel_format = image.GetPixelFormat()
        dtype = {
            (8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16,
        }[(pixel_format.GetBitsAllocated(), pixel_format.GetPixelRepresentation())]
        buffer = image.GetBuffer()
        if buffer is None:
            raise ValueError("GDCM decoded nothing")
        raw = buffer.encode("utf-8", errors="surrogateescape")
        rows, cols = int(ds.Rows), int(ds.Columns)
        return np.frombuffer(raw, dtype=dtype)[: rows * cols].reshape(rows, cols).copy()


def _child_decode(header: dict[str, Any], payload: bytearray) -> tuple[dict[str, Any], memoryview | bytes]:
    from pydicom.pixels import pixel_array

    failed: list[tuple[str, str]] = []
    try:
        ds = minimal_dataset(header["syntax"], header["attrs"], payload, header.get("sop_class", ""))
    except Exception as exc:
        return {"ok": False, "failed": [("dataset", type(exc).__name__)]}, b""
    for plugin in header["plugins"]:
        started = time.perf_counter()
        try:
            if plugin == GDCM_READER:
                array = _decode_with_gdcm_reader(ds)
            else:
                array = pixel_array(ds, decoding_plugin=plugin)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - pylibjpeg-rle's Rust panics are BaseExceptions
            failed.append((plugin, type(exc).__name__))
            continue
        array = np.ascontiguousarray(array)
        reply = {"ok": True, "plugin": plugin, "dtype": array.dtype.str, "shape": list(array.shape),
                 "failed": failed, "seconds": time.perf_counter() - started}
        return reply, array.data.cast("B") if array.nbytes else b""
    return {"ok": False, "failed": failed}, b""


def _child_main(argv: list[str]) -> int:
    parent = int(argv[0])
    _die_with_parent(parent, death_signal=argv[1:2] != ["watchdog"])
    requests = 0
    replies = os.dup(1)
    os.dup2(2, 1)  # anything a C library prints to stdout goes to stderr, not into the reply pipe
    sys.stdout = sys.stderr

    import logging
    import warnings

    warnings.simplefilter("ignore")  # pydicom's warnings quote values; the parent never sees them anyway
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    import pydicom.pixels  # noqa: F401 - import the decoders now, not on the first image
    for module in ("gdcm", "openjpeg", "rle", "jpeg_ls", "PIL.Image"):
        try:
            __import__(module)
        except ImportError:
            pass
    _send(replies, {"op": "ready", "pid": os.getpid()})
    while True:
        try:
            header, payload = _receive(requests, None)
        except EOFError:
            return 0
        if header.get("op") == "decode":
            reply, body = _child_decode(header, payload)
            _send(replies, reply, body)
        elif header.get("op") == "modules":
            _send(replies, {"ok": True, "modules": sorted({m.split(".")[0] for m in sys.modules})})
        else:
            _send(replies, {"ok": False, "failed": [("request", "unknown")]})


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
