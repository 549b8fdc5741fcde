"""The node's log format: one line per record that no request value can break, and no library text that may quote
dataset values.

- Every message is escaped (``ai.safe_text.escape`` rules: control characters such as a newline inside a received
  UID become ``\\n``), so a line in the log is always one record.
- Records of pydicom, highdicom and Python warnings (``logging.captureWarnings``) are logged with their level and
  origin but a fixed text: those libraries quote the offending value ("Invalid value for VR DA: '19501231'").
- A traceback keeps its frames (code, not data) and the exception's type; the exception's own text is kept only for
  the node's ``SafeMessage`` exceptions.
"""

from __future__ import annotations

import logging
import sys
import traceback
from types import TracebackType
from typing import Any

from ai.safe_text import WITHHELD, SafeMessage, escape

LIBRARIES_THAT_QUOTE_VALUES = ("pydicom", "highdicom", "py.warnings")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MESSAGE_LIMIT = 4000


def _quotes_values(logger_name: str) -> bool:
    return any(logger_name == name or logger_name.startswith(name + ".") for name in LIBRARIES_THAT_QUOTE_VALUES)


class SafeFormatter(logging.Formatter):
    """See the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        if _quotes_values(record.name) or isinstance(record.msg, BaseException):
            # an exception logged as the message (pynetdicom does this for errors in handlers) is its text
            message = f"{WITHHELD}: a {record.levelname.lower()} of {record.name}"
        else:
            try:
                message = record.getMessage()
            except Exception as exc:  # a bad format call must not lose the record
                message = f"unformattable log message ({type(exc).__name__}): {record.msg!r}"
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = escape(message, MESSAGE_LIMIT), None
        safe.exc_text = None
        return super().format(safe)

    def formatException(self, ei: Any) -> str:
        exc_type, exc, tb = ei
        return format_exception_safely(exc_type, exc, tb)


def format_exception_safely(exc_type: type[BaseException] | None, exc: BaseException | None,
                            tb: TracebackType | None) -> str:
    """Frames and exception types of the whole chain; messages only for ``SafeMessage`` exceptions."""
    lines = []
    seen: set[int] = set()
    chain: list[tuple[BaseException | None, TracebackType | None, type[BaseException] | None]] = []
    current, current_tb, current_type = exc, tb, exc_type
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, current_tb, current_type))
        nxt = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        current, current_tb, current_type = nxt, nxt.__traceback__ if nxt else None, type(nxt) if nxt else None
    if not chain:
        chain.append((exc, tb, exc_type))
    for index, (e, t, typ) in enumerate(reversed(chain)):
        if index:
            lines.append("During handling of the above exception, another exception occurred:")
        lines.append("Traceback (most recent call last):")
        lines.extend(line.rstrip("\n") for line in traceback.format_tb(t))
        name = typ.__name__ if typ is not None else "Exception"
        text = str(e).splitlines()[0] if isinstance(e, SafeMessage) and str(e) else WITHHELD
        lines.append(f"{name}: {escape(text, 300)}")
    return "\n".join(lines)


def setup_logging(level: str) -> None:
    """Root logging for every ``dicom-node`` command: the safe formatter on stderr, warnings through logging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    logging.captureWarnings(True)
    # pynetdicom's INFO lines are per-PDU chatter; its DEBUG level dumps whole messages.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
    # highdicom logs every module it copies at INFO: one line per attribute group and result object.
    logging.getLogger("highdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
