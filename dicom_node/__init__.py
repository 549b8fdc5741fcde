"""The DICOM side of the pneumoconiosis CAD node: Storage SCP intake, configuration and the command line."""

__version__ = "0.1.0"
