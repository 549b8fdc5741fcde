"""The cross-validation report folder: ROC, confusion-matrix and training-history PNGs plus report.json/report.md.

Figures are drawn on ``matplotlib.figure.Figure`` objects with an explicit Agg canvas instead of through pyplot:
no display is needed, the process-wide backend (which other code may rely on) is left untouched, and no figure
stays registered in pyplot's global state, so a ten-fold run does not accumulate open figures.

The metric dicts written here are those of ``train.metrics`` (``binary_summary`` for two classes,
``multiclass_metrics`` for more): keys n, threshold, accuracy, auc, auc_ci [lo, hi], sensitivity, specificity, qwk,
confusion. Missing keys leave their column out (or "n/a" in a row), so the same writer serves the binary and the
four-class task.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 150


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")  # tight: no axis label cut off
    return path


def plot_roc(curves: Sequence[tuple[Sequence[float], Sequence[float], str, float]], path: Path | str,
             title: str = "ROC curve") -> Path:
    """One ROC curve per (fpr, tpr, label, auc) on shared axes, with the chance diagonal; returns ``path``.

    Typically one thin curve per fold and the pooled out-of-fold curve (the paper's ROC figure); a curve whose label
    starts with "pooled" is drawn thick and black so that it stands out from the folds.
    """
    fig, ax = _figure(5.5, 5.0)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="chance")
    for fpr, tpr, label, auc in curves:
        pooled = str(label).lower().startswith("pooled")
        ax.plot(fpr, tpr, linewidth=2.5 if pooled else 1.2, color="black" if pooled else None,
                alpha=1.0 if pooled else 0.8, zorder=3 if pooled else 2, label=f"{label} (AUC {_fmt(auc)})")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false-positive rate)",
           ylabel="sensitivity (true-positive rate)", title=title, aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], path: Path | str,
                   title: str = "Confusion matrix") -> Path:
    """Confusion matrix (rows true, columns predicted) with each cell's count and row percentage; returns ``path``.

    The row percentage is the per-class recall, which is what a reader compares between classes of unequal size.
    """
    m = np.asarray(matrix, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(class_names):
        raise ValueError(f"matrix {m.shape} does not match {len(class_names)} class names")
    size = 2.0 + 1.1 * len(class_names)
    fig, ax = _figure(size + 1.0, size)
    image = ax.imshow(m, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, shrink=0.8)
    rows = m.sum(axis=1, keepdims=True)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            share = f"\n({100 * m[i, j] / rows[i, 0]:.0f} %)" if rows[i, 0] else ""
            ax.text(j, i, f"{m[i, j]}{share}", ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xticklabels=class_names,
           yticklabels=class_names, xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def _runs(histories: Any) -> list[list[Mapping[str, float]]]:
    """Normalise a history argument to a list of runs, each a list of per-epoch dicts.

    Accepted: one run (list of epoch dicts), several runs (list of such lists), and per run also
    ``train.engine.History`` or its JSON form (a dict with "epochs"), as written to history.json.
    """
    if is_dataclass(histories) or (isinstance(histories, Mapping) and "epochs" in histories):
        histories = [histories]
    histories = list(histories)
    if histories and isinstance(histories[0], Mapping) and "epochs" not in histories[0]:
        histories = [histories]  # a single run given as its epoch list
    runs = []
    for run in histories:
        if is_dataclass(run) and not isinstance(run, type):
            run = asdict(run)
        if isinstance(run, Mapping):
            run = run["epochs"]
        runs.append(list(run))
    return runs


def plot_history(histories: Any, path: Path | str, labels: Sequence[str] | None = None,
                 title: str = "Training history") -> Path:
    """Loss (left) and accuracy (right) per epoch, training solid and validation dashed, one colour per run.

    ``histories``: see ``_runs``; epoch dicts carry train_loss and val_loss, optionally train_acc and val_acc (and
    "epoch", else their position counts from 1). Runs are usually the folds; ``labels`` names them (default "fold
    1", ...). Without any accuracy the right panel says so rather than disappearing, so the figure layout is the
    same in every report.
    """
    runs = _runs(histories)
    labels = list(labels) if labels is not None else [f"fold {i + 1}" for i in range(len(runs))]
    fig, (ax_loss, ax_acc) = _figure(11.0, 4.2, ncols=2)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    has_acc = False
    for run, label, colour in zip(runs, labels, colours, strict=False):
        epochs = [e.get("epoch", i + 1) for i, e in enumerate(run)]
        for key, style, ax in (("train_loss", "-", ax_loss), ("val_loss", "--", ax_loss),
                               ("train_acc", "-", ax_acc), ("val_acc", "--", ax_acc)):
            points = [(x, e[key]) for x, e in zip(epochs, run, strict=False) if e.get(key) is not None]
            if points:
                has_acc |= ax is ax_acc
                ax.plot(*zip(*points, strict=False), linestyle=style, color=colour, linewidth=1.2,
                        label=label if key == "train_loss" else None)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    if not has_acc:
        ax_acc.text(0.5, 0.5, "no accuracy recorded", ha="center", va="center", transform=ax_acc.transAxes)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    # Legend: colours name the runs, line styles the split (two proxy entries instead of 2 x k labels).
    style_handles = [ax_loss.plot([], [], color="0.3", linestyle=s, label=n)[0]
                     for s, n in (("-", "training"), ("--", "validation"))]
    if len(runs) <= 10:
        ax_loss.legend(fontsize="x-small", ncols=2)
    else:  # too many runs to name: only the line styles
        ax_loss.legend(handles=style_handles, fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


# --- report.json / report.md ---------------------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays to Python, NaN/inf to null (strict JSON has no NaN), Paths to strings."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _ci(row: Mapping[str, Any]) -> tuple[Any, Any]:
    if "auc_ci" in row and row["auc_ci"] is not None:
        lo, hi = row["auc_ci"]
        return lo, hi
    return row.get("auc_lo"), row.get("auc_hi")


def _auc_cell(row: Mapping[str, Any]) -> str:
    if "auc" not in row:
        return "n/a"
    lo, hi = _ci(row)
    ci = f" ({_fmt(lo)}–{_fmt(hi)})" if _fmt(lo) != "n/a" and _fmt(hi) != "n/a" else ""
    return _fmt(row["auc"]) + ci


def _confusion_cell(row: Mapping[str, Any]) -> str:
    m = row.get("confusion")
    if m is None:
        return "n/a"
    return " / ".join(" ".join(str(int(v)) for v in r) for r in np.asarray(m))


COLUMNS: list[tuple[str, str]] = [("n", "n"), ("threshold", "Threshold"), ("accuracy", "Accuracy"),
                                  ("auc", "AUC (95 % CI)"), ("sensitivity", "Sensitivity"),
                                  ("specificity", "Specificity"), ("qwk", "QWK"), ("confusion", "Confusion")]


def _cell(key: str, row: Mapping[str, Any]) -> str:
    if key == "auc":
        return _auc_cell(row)
    if key == "confusion":
        return _confusion_cell(row)
    if key == "n":
        return str(row["n"]) if row.get("n") is not None else "n/a"
    return _fmt(row.get(key))


def _mean_sd_cell(key: str, rows: Sequence[Mapping[str, Any]]) -> str:
    if key in ("n", "confusion", "threshold"):
        return ""
    values = np.array([float(r[key]) if r.get(key) is not None else np.nan for r in rows])
    values = values[~np.isnan(values)]
    if values.size == 0:
        return "n/a"
    sd = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{values.mean():.3f} ± {sd:.3f}"


def results_table(per_fold: Sequence[Mapping[str, Any]], pooled: Mapping[str, Any] | None) -> str:
    """Markdown table: one row per fold, the folds' mean ± SD, and the pooled out-of-fold row."""
    rows = list(per_fold) + ([pooled] if pooled else [])
    columns = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    lines = ["| Fold | " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for i, row in enumerate(per_fold):
        name = str(row.get("fold", i + 1))
        lines.append(f"| {name} | " + " | ".join(_cell(k, row) for k, _ in columns) + " |")
    if len(per_fold) > 1:
        lines.append("| mean ± SD | " + " | ".join(_mean_sd_cell(k, per_fold) for k, _ in columns) + " |")
    if pooled:
        lines.append("| **pooled** | " + " | ".join(_cell(k, pooled) for k, _ in columns) + " |")
    return "\n".join(lines)


def confusion_table(matrix: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str] | None = None) -> str:
    m = np.asarray(matrix, dtype=np.int64)
    names = list(class_names) if class_names else [str(i) for i in range(m.shape[0])]
    lines = ["| true \\ predicted | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines += [f"| {names[i]} | " + " | ".join(str(v) for v in m[i]) + " |" for i in range(m.shape[0])]
    return "\n".join(lines)


RESERVED = {"pooled", "class_names", "title"}


def write_report(out_dir: Path | str, summary: Mapping[str, Any], per_fold: Sequence[Mapping[str, Any]]) -> Path:
    """Write report.json and report.md into ``out_dir``; returns the path of report.md.

    ``summary``: "pooled" (metrics of the pooled out-of-fold predictions), optionally "class_names" and "title";
    every other entry (k, seed, augmentation, threshold rule, final threshold, ...) is listed under Settings.
    ``per_fold``: one metrics dict per fold (an optional "fold" key names the row). PNGs already in ``out_dir`` are
    linked under Figures, so plot first, then write the report.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, per_fold = _jsonable(dict(summary)), [_jsonable(dict(f)) for f in per_fold]
    (out_dir / "report.json").write_text(json.dumps({"summary": summary, "per_fold": per_fold}, indent=2,
                                                    allow_nan=False) + "\n")
    pooled = summary.get("pooled")
    md = [f"# {summary.get('title', 'Training report')}", ""]
    settings = {k: v for k, v in summary.items() if k not in RESERVED}
    if settings:
        md += ["## Settings", ""] + [f"- **{k}**: {_setting(v)}" for k, v in settings.items()] + [""]
    md += ["## Results per fold and pooled", "",
           "Pooled: all out-of-fold predictions together (each image predicted once, by the model that did not "
           "train on it). Confusion: rows true class, columns predicted, rows separated by /.", "",
           results_table(per_fold, pooled), ""]
    if pooled and pooled.get("confusion") is not None:
        md += ["## Pooled confusion matrix", "", confusion_table(pooled["confusion"], summary.get("class_names")),
               ""]
    figures = sorted(p.name for p in out_dir.glob("*.png"))
    if figures:
        md += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def _setting(value: Any) -> str:
    if isinstance(value, float):
        return _fmt(value, 4)
    if isinstance(value, (Mapping, list)):
        return "`" + json.dumps(value) + "`"
    return str(value)

