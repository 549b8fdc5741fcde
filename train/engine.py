"""The training loop shared by the segmenter and the classifier: epochs, validation, checkpoints, resume,
early stopping, a progress bar; CPU or CUDA (with mixed precision on CUDA). Readable top to bottom on purpose.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

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
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    score_fn: Callable[[list[torch.Tensor], list[torch.Tensor]], float],
    cfg: FitConfig,
    train_transform: Callable[[torch.Tensor, torch.Tensor], Batch] | None = None,
    extra_state: dict | None = None,
    accuracy_fn: Callable[[Any, torch.Tensor], tuple[int, int]] | None = None,
) -> History:
    """Train ``model``; keep ``best.pt`` (by ``score_fn`` on validation) and ``last.pt`` (resumable) in out_dir.

    ``train_batches(epoch)`` yields (inputs, targets) on the CPU, freshly shuffled per epoch; ``train_transform``
    augments them on the device (training data only). Model outputs may be tensors or dicts of tensors (several
    heads). ``accuracy_fn(outputs, targets) -> (correct, count)`` adds train and validation accuracy per epoch.
    """
    device = resolve_device(cfg.device)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history = History()
    start_epoch = 0

    last_path = cfg.out_dir / "last.pt"
    if last_path.exists():  # resume
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = History(**state["history"])
        start_epoch = len(history.epochs)
        if cfg.progress:
            print(f"resuming from {last_path} after epoch {start_epoch}")

    seed_everything(cfg.seed + start_epoch)
    started = time.perf_counter() - history.seconds
    sign = 1 if cfg.higher_is_better else -1
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        total, count, correct, judged = 0.0, 0, 0, 0
        batches = train_batches(epoch)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for inputs, targets in bar:
            inputs, targets = inputs.to(device), targets.to(device)
            if train_transform is not None:
                inputs, targets = train_transform(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                outputs = model(inputs)
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

        val_loss, score, outputs, targets = evaluate(model, val_batches(), loss_fn, score_fn, device,
                                                     keep_outputs=True)
        record = {"epoch": epoch + 1, "train_loss": total / max(count, 1), "val_loss": val_loss, "val_score": score}
        if accuracy_fn is not None:
            record["train_acc"] = correct / max(judged, 1)
            c, n = accuracy_fn(_concat(outputs), torch.cat(targets)) if outputs else (0, 0)
            record["val_acc"] = c / max(n, 1)
        history.epochs.append(record)
        improved = math.isnan(history.best_score) or sign * (score - history.best_score) > 0
        if improved:
            history.best_score, history.best_epoch = score, epoch + 1
            torch.save({"model": model.state_dict(), "epoch": epoch + 1, "score": score, **(extra_state or {})},
                       cfg.out_dir / "best.pt")
        history.seconds = time.perf_counter() - started
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": asdict(history)}, last_path)
        if cfg.progress:
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val loss {val_loss:.4f}, "
                  f"val score {score:.4f}{' *' if improved else ''} ({history.seconds:.0f} s)", flush=True)
        if epoch + 1 - history.best_epoch >= cfg.patience:
            history.stopped_early = True
            break

    (cfg.out_dir / "history.json").write_text(json.dumps(asdict(history), indent=2))
    best = torch.load(cfg.out_dir / "best.pt", map_location=device, weights_only=False)
    model.load_state_dict(best["model"])
    return history


def _detach(out: Any) -> Any:
    if isinstance(out, dict):
        return {k: v.detach().float().cpu() for k, v in out.items()}
    return out.detach().float().cpu()


def _concat(outputs: list[Any]) -> Any:
    if isinstance(outputs[0], dict):
        return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    return torch.cat(outputs)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], loss_fn, score_fn, device: torch.device,
             keep_outputs: bool = False):  # type: ignore[no-untyped-def]
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
