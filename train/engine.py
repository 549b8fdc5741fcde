"""The training loop shared by the segmenter and the classifier: epochs, validation, checkpoints, resume,
early stopping, a progress bar; CPU or CUDA (mixed precision: float16 on CUDA by default, bfloat16 on request, which
CPUs with AMX run 2-3x faster than float32). Readable top to bottom on purpose.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ai import checkpoint
from ai.precision import PRECISIONS

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class FitConfig:
    epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 0.0
    patience: int = 10  # epochs without improvement of the validation score before stopping
    device: str = "auto"
    seed: int = 0
    out_dir: Path = Path("runs/train")
    progress: bool = True
    higher_is_better: bool = True
    lr_schedule: str = "constant"  # or "cosine": see ``epoch_lr``
    precision: str = "auto"  # "auto" (float16 autocast on CUDA, float32 on CPU), "fp32" or "bf16": see ``amp_dtype``


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("nan")
    stopped_early: bool = False
    seconds: float = 0.0


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[Batch]],
    val_batches: Callable[[], Iterable[Batch]],
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    score_fn: Callable[[list[Any], list[torch.Tensor]], float],
    cfg: FitConfig,
    train_transform: Callable[[torch.Tensor, torch.Tensor], Batch] | None = None,
    extra_state: dict | None = None,
    accuracy_fn: Callable[[Any, torch.Tensor], tuple[int, int]] | None = None,
) -> History:
    """Train ``model``; keep ``best.pt`` (by ``score_fn`` on validation) and ``last.pt`` (resumable) in out_dir.

    ``train_batches(epoch)`` yields (inputs, targets) on the CPU, freshly shuffled per epoch; ``train_transform``
    augments them on the device (training data only). Model outputs may be tensors or dicts of tensors (several
    heads). ``accuracy_fn(outputs, targets) -> (correct, count)`` adds train and validation accuracy per epoch.
    Each epoch: ``train_one_epoch``, ``validate``, then the checkpoints (``save_best`` when the score improved,
    ``save_last`` always) and the early-stopping rule (``patience_exhausted``). At the end the best weights are
    loaded back into ``model``.
    """
    device = resolve_device(cfg.device)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = amp_dtype(cfg.precision, device)
    # Only float16 needs loss scaling: bfloat16 has float32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    best_path, last_path = cfg.out_dir / "best.pt", cfg.out_dir / "last.pt"
    history = resume(last_path, model, optimizer, device, cfg.progress)
    start_epoch = len(history.epochs)

    seed_everything(cfg.seed + start_epoch)
    started = time.perf_counter() - history.seconds
    for epoch in range(start_epoch, cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(cfg, epoch)
        trained = train_one_epoch(model, train_batches(epoch), loss_fn, optimizer, scaler, device,
                                  transform=train_transform, accuracy_fn=accuracy_fn, amp=dtype,
                                  description=f"epoch {epoch + 1}/{cfg.epochs}", progress=cfg.progress)
        validated = validate(model, val_batches(), loss_fn, score_fn, device, accuracy_fn)
        record = {"epoch": epoch + 1, "train_loss": trained["loss"], "val_loss": validated["loss"],
                  "val_score": validated["score"]}
        if accuracy_fn is not None:
            record["train_acc"], record["val_acc"] = trained["acc"], validated["acc"]
        history.epochs.append(record)
        improved = is_improvement(history, record["val_score"], cfg.higher_is_better)
        if improved:
            history.best_score, history.best_epoch = record["val_score"], epoch + 1
            save_best(best_path, model, epoch + 1, record["val_score"], extra_state)
        history.seconds = time.perf_counter() - started
        save_last(last_path, model, optimizer, history)
        if cfg.progress:
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
                  f"val score {record['val_score']:.4f}{' *' if improved else ''} ({history.seconds:.0f} s)",
                  flush=True)
        if patience_exhausted(history, epoch + 1, cfg.patience):
            history.stopped_early = True
            break

    (cfg.out_dir / "history.json").write_text(json.dumps(asdict(history), indent=2))
    model.load_state_dict(checkpoint.read(best_path, map_location=device)["model"])
    return history


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of the training passes, or None for plain float32 (the inference choices of
    ``ai.precision``, but "auto" means float16 on CUDA here). The weights and the optimizer stay in float32 whatever
    the choice (autocast casts per operation), so the checkpoints are the same kind of file."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda":
        return torch.float16
    return None


COSINE_FLOOR = 0.02  # the cosine schedule's last epochs still learn a little: lr never falls below this share


def epoch_lr(cfg: FitConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based): ``cfg.lr`` throughout, or with ``"cosine"`` decayed along half a
    cosine from ``cfg.lr`` in the first epoch towards ``COSINE_FLOOR * cfg.lr`` in the last. A pure function of the
    epoch, so a resumed run continues the same schedule without storing a scheduler's state."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r} (constant or cosine)")
    progress = epoch / max(cfg.epochs - 1, 1)
    return cfg.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    transform: Callable[[torch.Tensor, torch.Tensor], Batch] | None = None,
    accuracy_fn: Callable[[Any, torch.Tensor], tuple[int, int]] | None = None,
    amp: torch.dtype | None = None,
    description: str = "",
    progress: bool = True,
) -> dict[str, float]:
    """One pass over the training batches (autocast to ``amp`` when given): the mean loss per input and, with
    ``accuracy_fn``, the accuracy (``{"loss": ..., "acc": ...}``)."""
    model.train()
    total, count, correct, judged = 0.0, 0, 0, 0
    bar = tqdm(batches, desc=description, disable=not progress, leave=False)
    for inputs, targets in bar:
        inputs, targets = inputs.to(device), targets.to(device)
        if transform is not None:
            inputs, targets = transform(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outputs = model(inputs)
        # The loss in float32 from float32 outputs: a Dice sum over 65k pixels is not exact in a 16-bit type.
        outputs = _float32(outputs)
        loss = loss_fn(outputs, targets)
        if accuracy_fn is not None:
            c, n = accuracy_fn(_detach(outputs), targets)
            correct, judged = correct + c, judged + n
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * inputs.shape[0]
        count += inputs.shape[0]
        bar.set_postfix(loss=f"{total / count:.4f}")
    result = {"loss": total / max(count, 1)}
    if accuracy_fn is not None:
        result["acc"] = correct / max(judged, 1)
    return result


def _float32(outputs: Any) -> Any:
    """Model outputs (a tensor or a dict of tensors, as from autocast) as float32."""
    if isinstance(outputs, dict):
        return {k: v.float() for k, v in outputs.items()}
    return outputs.float()


def validate(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
             score_fn: Callable[[list[Any], list[torch.Tensor]], float], device: torch.device,
             accuracy_fn: Callable[[Any, torch.Tensor], tuple[int, int]] | None = None) -> dict[str, float]:
    """``evaluate`` on the validation batches: loss, score and, with ``accuracy_fn``, accuracy (``{"loss": ...,
    "score": ..., "acc": ...}``)."""
    loss, score, outputs, targets = evaluate(model, batches, loss_fn, score_fn, device, keep_outputs=True)
    result = {"loss": loss, "score": float(score)}  # a Python float: last.pt must load with weights_only
    if accuracy_fn is not None:
        c, n = accuracy_fn(_concat(outputs), torch.cat(targets)) if outputs else (0, 0)
        result["acc"] = c / max(n, 1)
    return result


# --- checkpoints and early stopping ------------------------------------------------------------------------------

def resume(last_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
           progress: bool = True) -> History:
    """The history so far, with model and optimizer restored from ``last_path`` when an earlier run left it;
    a new history otherwise."""
    if not last_path.exists():
        return History()
    state = checkpoint.read(last_path, map_location=device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    history = History(**state["history"])
    if progress:
        print(f"resuming from {last_path} after epoch {len(history.epochs)}")
    return history


def save_best(path: Path, model: nn.Module, epoch: int, score: float, extra_state: dict | None = None) -> None:
    """The weights of the best epoch so far, with ``extra_state`` (what rebuilding the model needs)."""
    torch.save({"model": model.state_dict(), "epoch": epoch, "score": score, **(extra_state or {})}, path)


def save_last(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, history: History) -> None:
    """Everything ``resume`` needs to go on after this epoch."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": asdict(history)}, path)


def is_improvement(history: History, score: float, higher_is_better: bool = True) -> bool:
    """Whether ``score`` beats the best so far (any score beats none)."""
    sign = 1 if higher_is_better else -1
    return math.isnan(history.best_score) or sign * (score - history.best_score) > 0


def patience_exhausted(history: History, epochs_done: int, patience: int) -> bool:
    """Early stopping: ``patience`` epochs have passed since the best one."""
    return epochs_done - history.best_epoch >= patience


def _detach(out: Any) -> Any:
    if isinstance(out, dict):
        return {k: v.detach().float().cpu() for k, v in out.items()}
    return out.detach().float().cpu()


def _concat(outputs: list[Any]) -> Any:
    if isinstance(outputs[0], dict):
        return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    return torch.cat(outputs)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
             score_fn: Callable[[list[Any], list[torch.Tensor]], float], device: torch.device,
             keep_outputs: bool = False) -> tuple[Any, ...]:
    """Validation loss and score; with ``keep_outputs`` also the CPU outputs and targets per batch."""
    model.eval()
    outputs, targets, total, count = [], [], 0.0, 0
    for inputs, target in batches:
        inputs, target = inputs.to(device), target.to(device)
        out = model(inputs)
        total += loss_fn(out, target).item() * inputs.shape[0]
        count += inputs.shape[0]
        outputs.append(_detach(out))
        targets.append(target.cpu())
    result = (total / max(count, 1), score_fn(outputs, targets))
    return (*result, outputs, targets) if keep_outputs else result


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle_seed: int | None = None
                   ) -> Iterable[Batch]:
    """Batches of in-memory tensors, shuffled reproducibly when ``shuffle_seed`` is given."""
    order = torch.arange(len(x))
    if shuffle_seed is not None:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
