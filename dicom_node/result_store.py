"""Durable storage of result objects under ``<storage_root>/results/<Study>/<Series>/<SOP>.dcm``.

Written to tmp/, fsynced, then renamed into place, like received instances: a result row is only ever committed
for a file that is whole on disk. Writing the same UID again (the same input and models) replaces the file with
the same object.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from db.results import ResultFile

from .archive import Archive


class ResultStore:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.results_dir = archive.root / "results"

    def path_for(self, ds: Dataset) -> Path:
        return self.results_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"

    def write(self, kind: str, ds: Dataset, analysed: bool, reason: str) -> ResultFile:
        target = self.path_for(ds)
        self.archive.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{kind}-", suffix=".dcm", dir=self.archive.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                dcmwrite(fh, ds, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
            self.archive.place(Path(tmp_name), target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return ResultFile(kind=kind, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                          series_instance_uid=str(ds.SeriesInstanceUID),
                          transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                          archive_path=self.archive.relative(target), size_bytes=target.stat().st_size,
                          analysed=analysed, reason=reason)
