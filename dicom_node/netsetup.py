"""Process-wide settings for pynetdicom, made once at start-up (``configure_pynetdicom``), never by a constructor.

pynetdicom keeps its behaviour switches in module globals (``pynetdicom._config``), and it writes each received
dataset with ``tempfile.NamedTemporaryFile`` into the process's default temporary directory: settings of the whole
process, not of one AE. So ``dicom-node serve`` and ``dicom-node worker`` call ``configure_pynetdicom`` once at
start-up, and a test that builds a ``StorageServer`` or a ``StoreClient`` (an ``Exporter``) itself calls it in its
fixture; ``StorageServer.start`` and ``StoreClient`` refuse to run without it (``require_configured``). It sets:

- ``_config.STORE_SEND_CHUNKED_DATASET = True``: the Storage SCU (``dicom_node.store_scu``) sends a result file's
  bytes from disk as they are (no decode, no re-encode) when the peer accepts the file's own transfer syntax;
- ``_config.STORE_RECV_CHUNKED_DATASET = True``: the Storage SCP (``dicom_node.scp``) receives each dataset straight
  into a temporary file, and the C-STORE handler gets its path, never a decoded dataset;
- with ``receive_dir`` (``serve``: the storage root's ``tmp/``), ``tempfile.tempdir``: those temporary files lie on
  the archive's file system, so placing one in the archive is a rename (start-up empties that directory). This
  applies to every other ``tempfile`` user in the process as well.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pynetdicom import _config


class NotConfigured(RuntimeError):
    """pynetdicom was not configured for the node (``configure_pynetdicom`` was not called at start-up)."""


def configure_pynetdicom(receive_dir: Path | str | None = None) -> None:
    """Set the process-wide settings of the module docstring; ``receive_dir`` also makes it the temporary
    directory of the process (where pynetdicom writes received datasets). Calling it again changes nothing else."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.STORE_RECV_CHUNKED_DATASET = True
    if receive_dir is not None:
        tempfile.tempdir = str(receive_dir)


def require_configured(receive_dir: Path | None = None) -> None:
    """Raise ``NotConfigured`` unless ``configure_pynetdicom`` ran (with ``receive_dir``, when given)."""
    if not (_config.STORE_SEND_CHUNKED_DATASET and _config.STORE_RECV_CHUNKED_DATASET):
        raise NotConfigured("pynetdicom is not configured: call dicom_node.netsetup.configure_pynetdicom() at "
                            "start-up")
    if receive_dir is not None and Path(tempfile.gettempdir()).resolve() != Path(receive_dir).resolve():
        raise NotConfigured("received datasets would not be written to the archive's tmp/ directory: call "
                            "dicom_node.netsetup.configure_pynetdicom(archive.tmp_dir) at start-up")
