"""Draw the lung fields the node finds on a few images, side by side, for judging the segmenter by eye.

    python -m train.overlay_figure OUT.png FILE [FILE ...]

Right lung (label 1) in orange, left lung (label 2) in cyan; refused images say why in their title.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ai import analyse  # noqa: E402
from ai.lungs import LEFT_LUNG, RIGHT_LUNG  # noqa: E402
from ai.normalise import normalise  # noqa: E402


def draw(files: list[Path], out: Path, width_per_image: float = 3.2) -> None:
    fig, axes = plt.subplots(1, len(files), figsize=(width_per_image * len(files), width_per_image * 1.15))
    axes = np.atleast_1d(axes)
    for ax, path in zip(axes, files, strict=False):
        record = analyse(path, device="cpu")
        image = record.image.pixels if record.image is not None else normalise(path).pixels
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if record.labels is not None:
            for value, colour in ((RIGHT_LUNG, "orange"), (LEFT_LUNG, "cyan")):
                ax.contour(record.labels == value, levels=[0.5], colors=colour, linewidths=1.2)
            title = f"{path.name[:28]}\nanalysed"
        else:
            title = f"{path.name[:28]}\nrefused: {record.reason}"
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    draw(args.files, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
