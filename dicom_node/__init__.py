"""The node around the analysis (``ai``) and the database (``db``): the Storage SCP and its intake, archive
reconciliation, the analysis workers and their supervisor, the result objects (``dicom_node.results``), the export to
PACS, the scheduler of the serve process's periodic jobs, configuration and the ``dicom-node`` command line."""

__version__ = "0.1.0"
