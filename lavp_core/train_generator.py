"""Train the small DCGAN generator that GIFD uses as its image prior.

A standard DCGAN (Radford et al.): the generator of :mod:`lavp_core.generative` against a
four-layer convolutional discriminator, binary cross-entropy with logits, Adam (lr 2e-4,
betas 0.5 / 0.999), batch 64, on the 32x32 training crops of a bundled dataset with random
horizontal flips. Every random draw (weights, shuffling, flips, latents) comes from one explicit
``torch.Generator`` seeded from the config, so a run is reproducible and resumable: the full state
(both networks, both optimisers, the random state, the loss curve) is written to a checkpoint file
after every epoch (atomically, through a temporary file) and ``resume=True`` continues from it.

At the end, the generator's batch-norm running statistics are recomputed exactly over many random
latents (the attack runs the generator in eval mode), and only its state dict is saved, with a JSON
file beside it giving the command, the epochs, the seconds, the loss curve and the SHA-256 of the
checkpoint. The per-epoch state stays in the git-ignored ``tmp/`` folder, so a finished run can be
extended with ``--resume --epochs N``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import load_dataset
from .errors import CheckpointError, ConfigError
from .generative import DcganGenerator, dcgan_init
from .hashing import sha256_file
from .models import ASSETS

RESUME_DIR = ASSETS.parent / "tmp" / "train-generator"  # git-ignored (/tmp/ at the repository root)


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Settings of one DCGAN training run.

    Args:
        dataset: bundled dataset whose ``train`` split is learned (32x32 RGB).
        epochs: passes over the training crops.
        batch_size: crops per step (the last incomplete batch of an epoch is dropped).
        lr: Adam learning rate of both networks.
        beta1: Adam's first-moment decay (DCGAN uses 0.5).
        latent_dim: size of the latent code.
        width: channel width of the last hidden generator layer (the layers before have 2x, 4x).
        seed: seed of the ``torch.Generator`` that drives every random draw.
        recalibration_batches: batches of 256 random latents used to recompute the generator's
            batch-norm statistics at the end.
    """

    dataset: str = "photos"
    epochs: int = 64
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    latent_dim: int = 64
    width: int = 32
    seed: int = 0
    recalibration_batches: int = 40

    def validated(self) -> GeneratorTrainConfig:
        """Return ``self`` after checking every field; raise :class:`ConfigError` otherwise."""
        for name in ("epochs", "batch_size", "latent_dim", "width", "recalibration_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be positive, got {self.lr!r}")
        if not 0 <= self.beta1 < 1:
            raise ConfigError(f"beta1 must lie in [0, 1), got {self.beta1!r}")
        return self


@dataclass(frozen=True)
class GeneratorTrainSummary:
    """What a finished training run wrote and how it went.

    ``curve`` holds one (mean discriminator loss, mean generator loss) pair per epoch.
    """

    out: Path
    metadata: Path
    epochs: int
    seconds: float
    sha256: str
    curve: tuple[tuple[float, float], ...]


class Discriminator(nn.Module):
    """DCGAN discriminator: image01 (B, 3, 32, 32) -> real/fake logit (B,)."""

    def __init__(self, width: int = 32, channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),  # (w, 16, 16)
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),  # (2w, 8, 8)
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * width),
            nn.LeakyReLU(0.2),  # (4w, 4, 4)
            nn.Conv2d(4 * width, 1, 4, 1, 0),  # (1, 1, 1)
        )

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        return self.body(image01 * 2.0 - 1.0).flatten()


def _build(cls, generator: torch.Generator, device: torch.device, **kwargs) -> nn.Module:
    with torch.device("meta"):  # construction consumes no global randomness
        module = cls(**kwargs)
    module = module.to_empty(device="cpu")
    dcgan_init(module, generator)
    return module.to(device)


def default_resume_path(out: str | os.PathLike) -> Path:
    """Where the per-epoch training state for ``out`` is kept (outside the shipped assets)."""
    return RESUME_DIR / f"{Path(out).stem}.resume.pt"


@torch.no_grad()
def recalibrate_batch_norm(gan: DcganGenerator, generator: torch.Generator, batches: int,
                           batch_size: int = 256) -> DcganGenerator:
    """A copy of ``gan`` whose batch-norm running statistics are exact averages over random latents.

    Training keeps exponential moving averages that lag behind the weights; the attack runs the
    generator in eval mode, so the statistics are recomputed here (cumulative average, train mode).
    """
    calibrated = copy.deepcopy(gan)
    norms = [m for m in calibrated.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    calibrated.train()
    device = next(calibrated.parameters()).device
    for _ in range(batches):
        z = torch.randn(batch_size, calibrated.latent_dim, generator=generator, device=generator.device)
        calibrated(z.to(device))
    for m in norms:
        m.momentum = 0.1
    return calibrated.eval()


def _atomic_save(payload, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train_generator(config: GeneratorTrainConfig, out: str | os.PathLike, *, resume: bool = False,
                    resume_path: str | os.PathLike | None = None, command: str = "",
                    device: torch.device | str = "cpu", progress: bool = True) -> GeneratorTrainSummary:
    """Train the DCGAN generator and write ``out`` (state dict) and ``out`` with ``.json``.

    Args:
        config: the training settings.
        out: path of the generator checkpoint to write (e.g. ``assets/generator/dcgan-photos.pt``).
        resume: continue from the per-epoch state at ``resume_path`` if it exists.
        resume_path: per-epoch training state (default :func:`default_resume_path`). It is kept after
            the run, so ``resume=True`` with more epochs extends a finished run.
        command: the command line to record in the JSON file.
        device: where to train.
        progress: show a tqdm bar with the discriminator and generator losses.
    """
    config = config.validated()
    device = torch.device(device)
    out = Path(out)
    resume_path = Path(resume_path) if resume_path is not None else default_resume_path(out)
    data = load_dataset(config.dataset, "train")
    if data.info.image_shape != (3, 32, 32):
        raise ConfigError(f"the DCGAN generator makes 3x32x32 images; dataset {config.dataset!r} has "
                          f"shape {data.info.image_shape}: pick photos or faces")
    images, _ = data.batch(range(len(data)))  # (N, 3, 32, 32) in [0, 1]
    images = images.to(device)
    batches = len(data) // config.batch_size
    if batches == 0:
        raise ConfigError(f"batch size {config.batch_size} exceeds the {len(data)} training images")

    rng = torch.Generator(device="cpu").manual_seed(config.seed)
    gan = _build(DcganGenerator, rng, device, latent_dim=config.latent_dim, width=config.width).train()
    disc = _build(Discriminator, rng, device, width=config.width).train()
    opt_g = torch.optim.Adam(gan.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
    curve: list[tuple[float, float]] = []
    start_epoch, seconds_before = 0, 0.0
    if resume and resume_path.is_file():
        try:
            state = torch.load(resume_path, map_location=device, weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise CheckpointError(f"cannot read the training state {resume_path} ({exc.__class__.__name__}); "
                                  f"delete it and train without --resume") from exc
        saved = dict(state["config"])
        mine = asdict(config)
        differs = [k for k in mine if k != "epochs" and saved.get(k) != mine[k]]
        if differs:
            raise ConfigError(f"the training state {resume_path} was made with different settings "
                              f"({', '.join(f'{k}={saved.get(k)!r}' for k in differs)}); use the same "
                              f"settings, or delete it to start over")
        gan.load_state_dict(state["generator"])
        disc.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_generator"])
        opt_d.load_state_dict(state["opt_discriminator"])
        rng.set_state(state["rng"])
        curve = [(float(d), float(g)) for d, g in state["curve"]]
        start_epoch, seconds_before = int(state["epoch"]), float(state["seconds"])

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.epochs * batches, initial=min(start_epoch, config.epochs) * batches,
                   desc="train-generator", unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    ema_d = ema_g = None
    ones = torch.ones(config.batch_size, device=device)
    zeros = torch.zeros(config.batch_size, device=device)
    for epoch in range(start_epoch, config.epochs):
        order = torch.randperm(len(data), generator=rng).to(device)
        sum_d = sum_g = 0.0
        for b in range(batches):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            real = images[idx]  # (B, 3, 32, 32)
            flip = (torch.rand(config.batch_size, generator=rng) < 0.5).to(device).view(-1, 1, 1, 1)
            real = torch.where(flip, real.flip(-1), real)
            z = torch.randn(config.batch_size, config.latent_dim, generator=rng).to(device)
            fake = gan(z)

            opt_d.zero_grad(set_to_none=True)
            loss_d = (F.binary_cross_entropy_with_logits(disc(real), ones)
                      + F.binary_cross_entropy_with_logits(disc(fake.detach()), zeros))
            loss_d.backward()
            opt_d.step()

            opt_g.zero_grad(set_to_none=True)
            loss_g = F.binary_cross_entropy_with_logits(disc(fake), ones)
            loss_g.backward()
            opt_g.step()

            d, g = loss_d.detach().item(), loss_g.detach().item()
            if not (math.isfinite(d) and math.isfinite(g)):
                raise ConfigError(f"training diverged at epoch {epoch + 1} (D loss {d}, G loss {g}); "
                                  f"lower --lr or change --seed")
            sum_d, sum_g = sum_d + d, sum_g + g
            ema_d = d if ema_d is None else 0.95 * ema_d + 0.05 * d
            ema_g = g if ema_g is None else 0.95 * ema_g + 0.05 * g
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, D=f"{ema_d:.3f}", G=f"{ema_g:.3f}")
        curve.append((sum_d / batches, sum_g / batches))
        _atomic_save({
            "generator": gan.state_dict(), "discriminator": disc.state_dict(),
            "opt_generator": opt_g.state_dict(), "opt_discriminator": opt_d.state_dict(),
            "rng": rng.get_state(), "curve": [list(p) for p in curve], "epoch": epoch + 1,
            "seconds": seconds_before + time.perf_counter() - started, "config": asdict(config),
        }, resume_path)
    if bar is not None:
        bar.close()
    seconds = seconds_before + time.perf_counter() - started

    calibration_rng = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    final = recalibrate_batch_norm(gan, calibration_rng, config.recalibration_batches)
    state = {k: v.detach().cpu().clone() for k, v in final.state_dict().items()}
    _atomic_save(state, out)
    digest = sha256_file(out)
    metadata = out.with_suffix(".json")
    record = {
        "command": command or f"python -m lavp_core train-generator --dataset {config.dataset} "
                              f"--epochs {config.epochs} --out {out}",
        "epochs": config.epochs,
        "seconds": round(seconds, 1),
        "sha256": digest,
        "bytes": out.stat().st_size,
        "config": asdict(config),
        "architecture": {"class": "DcganGenerator", "latent_dim": config.latent_dim, "width": config.width,
                         "parameters": sum(p.numel() for p in final.parameters())},
        "train_images": len(data),
        "loss_curve": {"discriminator": [round(d, 4) for d, _ in curve],
                       "generator": [round(g, 4) for _, g in curve]},
        "torch": torch.__version__,
    }
    metadata.write_text(json.dumps(record, indent=2) + "\n")
    return GeneratorTrainSummary(out, metadata, config.epochs, seconds, digest, tuple(curve))
