"""The Storage SCP's in-process C-STORE metrics: how many were answered with which status, and how long the node
took to answer them. They live in this process only (``dicom-node serve``); the console's ``/metrics`` exposes
``REGISTRY`` when it runs inside ``serve`` (``dicom_node.console.metrics``).

The time observed is the C-STORE handler's: from the moment pynetdicom hands over the complete dataset (already
streamed into ``tmp/``) to the status returned, i.e. the node's own work (fsync, parse, checks, rename, commit). The
transfer of the dataset itself is left out: it depends on the modality's network and the image's size, and
pynetdicom gives no reliable start of a message's first P-DATA to the handler.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# The intake's answer takes ~5 ms on an idle node and ~150 ms at its p95 under load (README); a stuck fsync or
# database lock shows as the tail.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CSTORE_TOTAL = Counter("pneumo_cstore", "C-STORE requests answered by this node's Storage SCP, by response status",
                       ["status"], registry=REGISTRY)
CSTORE_SECONDS = Histogram("pneumo_cstore_seconds",
                           "Seconds from the complete dataset received to the C-STORE response status, by status "
                           "(the node's own work: fsync, checks, rename, commit; not the network transfer)",
                           ["status"], buckets=BUCKETS, registry=REGISTRY)


def status_label(status: int) -> str:
    """A DIMSE status as the label value: ``0x0000``, ``0xA700``, ..."""
    return f"0x{status & 0xFFFF:04X}"


def observe_store(status: int, seconds: float) -> None:
    """One C-STORE answered with ``status`` after ``seconds`` of handling."""
    label = status_label(status)
    CSTORE_TOTAL.labels(status=label).inc()
    CSTORE_SECONDS.labels(status=label).observe(max(0.0, seconds))
