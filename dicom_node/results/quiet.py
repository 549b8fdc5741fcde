"""Library chatter that may quote patient values, kept out of logs while the node reads a header or builds results.

pydicom warns *and logs* what it finds wrong, the value included ("Invalid value for VR DA: '19501231'"), and
highdicom warns about single-component person names quoting the name. While this thread is inside ``quiet()``:

- every Python warning is caught and dropped; a DEBUG line names its category and origin (file and line: code,
  never data), so a warning is not lost without trace;
- the ``pydicom`` logger's records from this thread are dropped (a filter on that logger: other threads, e.g. the
  SCP's reception threads, keep theirs).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

LOG = logging.getLogger(__name__)
_state = threading.local()


class _DropWhileQuiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_state, "depth", 0)


_FILTER = _DropWhileQuiet()
logging.getLogger("pydicom").addFilter(_FILTER)


@contextmanager
def quiet(what: str = "header") -> Iterator[None]:
    outermost = not getattr(_state, "depth", 0)
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        _state.depth -= 1
    if outermost and caught:
        origins = sorted({f"{w.category.__name__} at {os.path.basename(w.filename)}:{w.lineno}" for w in caught})
        LOG.debug("%d library warning(s) withheld while handling the %s: %s", len(caught), what, "; ".join(origins))
