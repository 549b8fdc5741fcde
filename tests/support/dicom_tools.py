"""The external DICOM tools the tests run: one wrapper each, with the only notices that may be ignored.

- dciodvfy (dicom3tools): every line with "Error" fails; warnings (e.g. about the private coding scheme) do not.
  "Illegal root for UID" is ignored only where the caller says the source's own UIDs are off-root: results refer
  to them as they are (docs/results.md).
- dsrdump (DCMTK), verbose, content item errors downgraded to warnings: every W:/E:/F: line or "Warning" fails,
  except DCMTK's notice that its VR checker cannot check UTF-8 (every result object is ISO_IR 192): a limit of the
  tool, not a problem of the object.
- storescu (DCMTK) as the modality, with its per-file responses parsed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}

DSRDUMP_NO_UTF8_CHECK = "W: The VR checker does not support this Specific Character Set: ISO_IR 192"
"""The one dsrdump line that is allowed: DCMTK cannot check UTF-8 values and says so."""

OFF_ROOT_UID = "Illegal root for UID"
"""dciodvfy's complaint about a UID not under a registered root: allowed only for a source's off-root UIDs."""


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run the README's test command (it installs the Debian packages)")
    return path


# --- dciodvfy ---------------------------------------------------------------------------------------------------


def dciodvfy_output(path: Path) -> str:
    proc = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def _dciodvfy_error_lines(output: str, allow_off_root_uids: bool) -> list[str]:
    return [line for line in output.splitlines() if "Error" in line
            and not (allow_off_root_uids and OFF_ROOT_UID in line)]


def dciodvfy_errors(path: Path, allow_off_root_uids: bool = False) -> list[str]:
    """dciodvfy's error lines for ``path`` (none: valid). ``allow_off_root_uids``: the source's own UIDs are not
    under a valid root, and the result refers to them as they are."""
    return _dciodvfy_error_lines(dciodvfy_output(path), allow_off_root_uids)


def assert_dciodvfy_clean(path: Path, allow_off_root_uids: bool = False) -> str:
    """No dciodvfy error (see ``dciodvfy_errors``); returns the whole output."""
    output = dciodvfy_output(path)
    assert not _dciodvfy_error_lines(output, allow_off_root_uids), f"dciodvfy {path.name}:\n{output}"
    return output


# --- dsrdump ----------------------------------------------------------------------------------------------------


def dsrdump_output(path: Path) -> tuple[int, str]:
    proc = subprocess.run([require_tool("dsrdump"), "-Ee", "-v", str(path)], capture_output=True, text=True,
                          timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def _dsrdump_problem_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if (re.match(r"^[WEF]: ", line) or "Warning" in line)
            and line.strip() != DSRDUMP_NO_UTF8_CHECK]


def dsrdump_problems(path: Path) -> list[str]:
    """dsrdump's warnings and errors for an SR (none: valid), the UTF-8 notice left out; it must exit with 0."""
    returncode, output = dsrdump_output(path)
    assert returncode == 0, f"dsrdump {path.name} exited with {returncode}:\n{output}"
    return _dsrdump_problem_lines(output)


def assert_dsrdump_clean(path: Path) -> str:
    """No dsrdump problem (see ``dsrdump_problems``); returns the whole output."""
    returncode, output = dsrdump_output(path)
    assert returncode == 0 and not _dsrdump_problem_lines(output), f"dsrdump {path.name}:\n{output}"
    return output


# --- storescu and friends ---------------------------------------------------------------------------------------


@dataclass
class StoreResult:
    returncode: int
    output: str
    statuses: list[tuple[str, str]]  # (file name, "Success" or the failure text), in sending order


STORE_RE = re.compile(r"Sending file: (?P<file>\S+)|Received Store Response \((?P<status>[^)]*)\)|"
                      r"DIMSE Status\s*: (?P<code>0x[0-9a-fA-F]{4}: .*)")


def parse_storescu(output: str) -> list[tuple[str, str]]:
    """Pair each 'Sending file' line of ``storescu -v`` with the response that follows it."""
    results: list[tuple[str, str]] = []
    current: str | None = None
    for match in STORE_RE.finditer(output):
        if match.group("file"):
            current = match.group("file")
        elif current is not None and (match.group("status") or match.group("code")):
            status = match.group("status") or match.group("code").strip()
            results.append((current, "Success" if status.startswith("0x0000") else status))
            current = None
    return results


def storescu(port: int, files: list[Path] | list[str], *flags: str, aet: str = "STORESCU",
             timeout: float = 300) -> StoreResult:
    require_tool("storescu")
    cmd = ["storescu", "-v", "-aet", aet, "-aec", "PNEUMOCAD", *flags, "127.0.0.1", str(port), *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=PEER_ENV, timeout=timeout)
    output = proc.stdout + proc.stderr
    return StoreResult(proc.returncode, output, parse_storescu(output))


STORESCU_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    # 1.2.840.10008.1.2.4.57 (JPEG lossless process 14, not SV1): no storescu flag proposes it; see the -xf
    # profile in test_transfer_syntaxes.py.
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
"""storescu proposes only uncompressed syntaxes unless told: the flag that proposes a file's own syntax."""


def file_transfer_syntax(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def dcmtk_wire_encoding(path: Path, out: Path) -> Path:
    """The file as storescu puts it on the wire: DCMTK re-encodes sequences and items with explicit lengths and
    drops Data Set Trailing Padding, which is exactly what ``dcmconv -p`` writes. The node must store that
    byte for byte."""
    require_tool("dcmconv")
    subprocess.run(["dcmconv", "-p", str(path), str(out)], check=True, capture_output=True)
    return out
