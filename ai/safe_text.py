"""Log-safe texts: exception summaries that never quote dataset values, and request values that cannot forge lines.

pydicom, highdicom and the pixel decoders put the offending value in their exception texts ("Unable to convert
'1950-12-31' to 'DA'", "'Q' is not a valid PatientSexValues"). Such texts must not reach a log line or a database
column, so an exception is described by its type, the attribute keyword when the caller knows it, and a fixed
message. Only the node's own exceptions, whose messages are written from constants (``SafeMessage``), keep theirs.
"""

from __future__ import annotations

WITHHELD = "details withheld (library messages may quote dataset values)"
MAX_LENGTH = 300


class SafeMessage(Exception):
    """Mixin for the node's own exceptions: their message is built from constants and codes, never from values."""


def escape(value: object, limit: int = 128) -> str:
    """A request value (UID, AE title, file name) as one printable line: control characters escaped, bounded.
    Backslashes stay as they are (DICOM's value separator), so escaping twice changes nothing."""
    text = str(value)
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    line = "".join(out)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def exception_summary(exc: BaseException, keyword: str | None = None, message: str | None = None) -> str:
    """``Type[ (keyword)]: message``. The message is the caller's fixed text, the exception's own only for a
    ``SafeMessage``, and otherwise a note that it was withheld."""
    where = f" ({escape(keyword, 64)})" if keyword else ""
    if message is None:
        if isinstance(exc, SafeMessage) and str(exc):
            message = str(exc).splitlines()[0]
        else:
            message = WITHHELD
    return escape(f"{type(exc).__name__}{where}: {message}", MAX_LENGTH)
