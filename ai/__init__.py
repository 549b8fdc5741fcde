"""Image analysis: normalisation, lung-field segmentation and classification (no networking, no database).

``ai.analyse(dataset_or_file)`` is the entry point; it is imported lazily so that light users of the package
(the intake's header scope check) do not load torch.
"""

from typing import Any

__all__ = ["analyse", "analyse_batch", "AnalysisRecord"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import analysis as module

        return getattr(module, name)
    raise AttributeError(name)
