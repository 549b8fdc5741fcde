"""The node's own log output in a test: the root logger exactly as ``dicom-node`` sets it up."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from dicom_node.log_safety import setup_logging


@contextmanager
def node_log_output(level: str = "DEBUG") -> Iterator[io.StringIO]:
    """The safe formatter, warnings captured, at ``level``, writing into a buffer: what an operator's log file
    would hold. The root logger is restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging(level)
    buffer = io.StringIO()
    root.handlers[0].stream = buffer  # type: ignore[attr-defined]
    try:
        yield buffer
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
