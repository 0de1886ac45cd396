"""Train a registry architecture on a dataset and save a checkpoint with a JSON record beside it.

SGD with momentum, the paper's step schedule scaled to the epoch count (lr x0.1 at 1/2 and 3/4 of
the epochs), random-crop (pad 4) and horizontal-flip augmentation drawn from an explicit
``torch.Generator``. Resumable: the full training state is saved after every epoch to
``<out>.partial`` and picked up again by ``resume=True``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import ImageSet, load_dataset
from .errors import ConfigError
from .hashing import sha256_file as sha256_of  # the one file hash; train_generator imports it from here
from .models import create_model, snapshot_path


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. ``lr`` is SGD's initial learning rate; ``batch_size`` images per step."""

    arch: str = "resnet8"
    dataset: str = "photos"
    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    data_root: str | None = None

    def validated(self) -> TrainConfig:
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be a positive integer, got {self.epochs}")
        if self.batch_size <= 0 or self.lr <= 0:
            raise ConfigError("batch size and learning rate must be positive")
        return self


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    seconds: float


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and horizontal flips; images (B, C, H, W) in [0, 1]."""
    b, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator)
    dx = torch.randint(0, 9, (b,), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, dataset: ImageSet, device, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on a whole split."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        x, y = dataset.batch(range(start, min(len(dataset), start + batch_size)))
        logits = model(dataset.info.normalize(x).to(device))
        correct += int((logits.argmax(1).cpu() == y).sum())
    model.train(was_training)
    return correct / max(1, len(dataset))


def train(config: TrainConfig, out: str | os.PathLike, *, device: torch.device | str = "cpu",
          resume: bool = False, command: str = "", snapshots: tuple[int, ...] = (),
          progress: Callable[[EpochReport], None] | None = None,
          batch_progress: Callable[[int, int, float, float], None] | None = None) -> dict:
    """Train, save ``out`` (state dict) and the record beside it (``.json``); return the record.

    ``snapshots``: epochs after which the model is also kept, as ``<out stem>-epoch<E>.pt`` with its own
    provenance JSON (command, epoch, validation accuracy, SHA-256); epoch 0 is the initialisation the run
    starts from. ``progress`` is called after every epoch, ``batch_progress(step, steps, loss, acc)``
    after every batch (for a progress bar).
    """
    config = config.validated()
    snapshots = tuple(sorted({int(e) for e in snapshots}))
    if any(e < 0 or e > config.epochs for e in snapshots):
        raise ConfigError(f"snapshot epochs must lie in 0..{config.epochs} (the run's epochs), got {list(snapshots)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(out.suffix + ".partial")
    train_set = load_dataset(config.dataset, "train", root=config.data_root)
    val_set = load_dataset(config.dataset, "val", root=config.data_root)
    info = train_set.info
    model = create_model(config.arch, info.num_classes, seed=config.seed, in_channels=info.image_shape[0],
                         device=device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    milestones = [max(1, config.epochs // 2), max(1, (3 * config.epochs) // 4)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    start_epoch, elapsed, history = 0, 0.0, []
    if resume and partial.is_file():
        state = torch.load(partial, map_location=device, weights_only=True)
        if state.get("config") != _config_fingerprint(config):
            raise ConfigError(f"{partial} was written by a different training run; delete it or drop --resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start_epoch, elapsed, history = int(state["epoch"]), float(state["elapsed"]), list(state["history"])
    n = len(train_set)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size

    def keep_snapshot(epoch: int) -> None:
        if epoch in snapshots:
            _save_snapshot(model, snapshot_path(out, epoch), config, epoch, val_set, device, command)

    if start_epoch == 0:
        keep_snapshot(0)
    for epoch in range(start_epoch, config.epochs):
        tic = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        total_loss, correct, seen = 0.0, 0, 0
        model.train()
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size].tolist()
            x, y = train_set.batch(idx)
            x = info.normalize(_augment(x, generator)).to(device)
            y = y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if batch_progress is not None:
                batch_progress(epoch * steps_per_epoch + step + 1, config.epochs * steps_per_epoch,
                               total_loss / seen, correct / seen)
        scheduler.step()
        val_acc = evaluate_accuracy(model, val_set, device)
        elapsed += time.perf_counter() - tic
        report = EpochReport(epoch + 1, config.epochs, total_loss / seen, correct / seen, val_acc, elapsed)
        history.append([report.epoch, report.train_loss, report.train_accuracy, report.val_accuracy])
        keep_snapshot(epoch + 1)  # before the resumable state, so a resumed run never lacks one
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                    "epoch": epoch + 1, "elapsed": elapsed, "history": history,
                    "config": _config_fingerprint(config)}, partial)
        if progress is not None:
            progress(report)
    model.eval()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
    record = {
        "command": command, "arch": config.arch, "dataset": config.dataset, "epochs": config.epochs,
        "config": asdict(config), "val_accuracy": evaluate_accuracy(model, val_set, device),
        "train_seconds": round(elapsed, 1), "history": history, "sha256": sha256_of(out),
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    if partial.is_file():
        partial.unlink()
    return record


def _save_snapshot(model: torch.nn.Module, path: Path, config: TrainConfig, epoch: int, val_set: ImageSet,
                   device, command: str) -> None:
    """Keep the model as it is after ``epoch`` epochs, with its provenance beside it."""
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
    record = {"command": command, "arch": config.arch, "dataset": config.dataset, "epoch": epoch,
              "epochs": config.epochs, "config": asdict(config),
              "val_accuracy": evaluate_accuracy(model, val_set, device), "sha256": sha256_of(path),
              "torch": torch.__version__}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


def _config_fingerprint(config: TrainConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)
