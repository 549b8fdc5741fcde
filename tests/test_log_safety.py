"""The node's log format: request values cannot forge lines, library texts that quote dataset values are withheld,
tracebacks keep frames but not exception texts."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from ai.safe_text import SafeMessage, escape, exception_summary
from db.engine import init_schema, make_engine
from dicom_node.archive import Archive
from dicom_node.intake import CANNOT_PARSE, Intake
from dicom_node.log_safety import SafeFormatter

from .support.logs import node_log_output

PLANTED = "1950-12-31"


class _Own(SafeMessage, ValueError):
    pass


@pytest.fixture
def captured():
    """The root logger as ``dicom-node`` sets it up, at DEBUG, writing into a buffer."""
    with node_log_output() as buffer:
        yield buffer


def test_escape_keeps_one_line_and_bounds_length():
    assert escape("1.2.3\nFORGED line") == "1.2.3\\nFORGED line"
    assert escape("a\rb\x00c\\d") == "a\\rb\\x00c\\d"
    assert escape(escape("1.2\n3")) == escape("1.2\n3")
    assert len(escape("9" * 500, 64)) == 64


def test_exception_summary_withholds_library_texts_and_keeps_own():
    library = ValueError(f"Unable to convert '{PLANTED}' to 'DA'")
    assert PLANTED not in exception_summary(library)
    assert exception_summary(library, "PatientBirthDate").startswith("ValueError (PatientBirthDate): ")
    assert exception_summary(_Own("pixel data cannot be decoded")) == "_Own: pixel data cannot be decoded"
    assert exception_summary(library, message="fixed") == "ValueError: fixed"


def test_request_values_cannot_forge_a_log_line(captured):
    logging.getLogger("dicom_node.intake").warning("C-STORE sop=%s", "1.2.3\n2026-12-01 INFO forged: all fine")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 1 and "\\n2026-12-01 INFO forged" in lines[0]


def test_library_records_and_warnings_are_withheld(captured):
    logging.getLogger("pydicom").warning("Invalid value for VR DA: '%s'", PLANTED)
    logging.getLogger("highdicom.sr").error("bad value %s", PLANTED)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"The value '{PLANTED}' is not valid", UserWarning, stacklevel=1)
    out = captured.getvalue()
    assert PLANTED not in out
    assert out.count("details withheld") == 3 and "pydicom" in out and "py.warnings" in out


def test_tracebacks_keep_frames_but_not_exception_texts(captured):
    try:
        try:
            raise KeyError(PLANTED)
        except KeyError as inner:
            raise ValueError(f"'{PLANTED}' is not a valid DA") from inner
    except ValueError:
        logging.getLogger("dicom_node.worker").exception("job 1 failed")
    out = captured.getvalue()
    assert PLANTED not in out
    assert "test_tracebacks_keep_frames_but_not_exception_texts" in out  # the frames are there
    assert "KeyError: details withheld" in out and "ValueError: details withheld" in out


def test_formatter_survives_a_bad_format_call():
    record = logging.LogRecord("dicom_node", logging.INFO, __file__, 1, "two %s %s", ("only one",), None)
    assert "unformattable log message (TypeError)" in SafeFormatter().format(record)


def test_intake_logs_a_request_uid_with_a_newline_escaped(tmp_path: Path, captured):
    """In-process: the C-STORE log line of a request whose SOP Instance UID carries a newline stays one line."""
    archive = Archive(tmp_path / "var", 0)
    archive.prepare()
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'node.sqlite'}")
    init_schema(engine)
    received = archive.tmp_dir / "received.dcm"
    received.write_bytes(b"not a dataset")
    outcome = Intake(archive, engine, "reject").store(received, "MOD\nALITY", "1.2.840.10008.5.1.4.1.1.1",
                                                      "1.2.3\nINFO forged", "1.2.840.10008.1.2.1")
    assert outcome.status == CANNOT_PARSE
    lines = [line for line in captured.getvalue().splitlines() if "C-STORE" in line]
    assert len(lines) == 1 and "sop=1.2.3\\nINFO forged" in lines[0] and "MOD\\nALITY" in lines[0]
