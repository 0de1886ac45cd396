"""GIFD: generative gradient inversion over the feature domains of a small DCGAN.

GIFD (Fang et al., ICCV 2023) inverts a shared gradient through a pretrained generator. Stage 0
searches the latent code; each later stage cuts the generator after one more layer and optimises that
layer's output feature directly, kept inside an l1 ball around where the previous stage left it, so
the search moves from the generator's latent space towards the pixels while staying close to what the
generator can make. Here the generator is a small DCGAN trained on the bundled ``photos`` crops
(``python -m lavp_core train-generator``), shipped in ``assets/generator/``:

    latent (B, 64) -> block 0: linear, BN, ReLU   -> (B, 128, 4, 4)   feature of stage 1
                   -> block 1: deconv, BN, ReLU   -> (B, 64, 8, 8)    feature of stage 2
                   -> block 2: deconv, BN, ReLU   -> (B, 32, 16, 16)  feature of stage 3
                   -> block 3: deconv, tanh       -> (B, 3, 32, 32)   mapped to [0, 1]

The image in [0, 1] is normalised with the victim dataset's statistics before the victim model.
Every stage optimises all restarts as one batch with Adam (learning rate with a short warm-up and a
cosine ramp-down); the loss is cosine gradient matching + 1e-4 TV + 1e-6 ||x||_2 / (H W) on the
normalised image, the victim's per-candidate gradients coming from ``torch.func.vmap``. After each
step the latent is renormalised to its initial norm (stage 0) or the feature is projected onto its
l1 ball (stages >= 1). After each stage the restart with the lowest matching loss is kept; the next
stage starts from it (its other candidates start at random points inside the ball). The answer is the
stage with the lowest matching loss; every stage's image is kept for display.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import grad_and_value, vmap

from .attacks import AttackResult, AttackSnapshot, VictimRun, total_variation
from .data import DatasetInfo
from .errors import CheckpointError, ConfigError
from .gradients import ClientUpdate, GradientOracle, client_update
from .losses import get_loss
from .models import ASSETS
from .presets import (
    AttackKind,
    AttackPreset,
    AttackRequest,
    StreamedRun,
    register_kind,
    register_preset,
)

GENERATOR_PATH = ASSETS / "generator" / "dcgan-photos.pt"
TRAIN_COMMAND = ("python -m lavp_core train-generator --dataset photos --epochs 64 "
                 "--out assets/generator/dcgan-photos.pt")


# --------------------------------------------------------------------------------------------
# The generator


class DcganGenerator(nn.Module):
    """Small DCGAN generator: latent (B, latent_dim) -> image in [0, 1] (B, 3, 32, 32).

    ``blocks[i]`` maps the input of stage ``i`` (the latent for i = 0, the feature of block i - 1
    otherwise) to the next feature; the last block makes the image. :meth:`decode` runs the blocks
    from a given stage on, which is what GIFD's feature-domain stages need.
    """

    def __init__(self, latent_dim: int = 64, width: int = 32, channels: int = 3):
        super().__init__()
        self.latent_dim = latent_dim
        self.width = width
        w = width
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Linear(latent_dim, 4 * w * 16, bias=False), nn.Unflatten(1, (4 * w, 4, 4)),
                          nn.BatchNorm2d(4 * w), nn.ReLU()),  # (4w, 4, 4)
            nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w),
                          nn.ReLU()),  # (2w, 8, 8)
            nn.Sequential(nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w),
                          nn.ReLU()),  # (w, 16, 16)
            nn.Sequential(nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Tanh()),  # (3, 32, 32) in [-1, 1]
        ])

    @property
    def num_feature_stages(self) -> int:
        """How many intermediate features GIFD can optimise (blocks before the image)."""
        return len(self.blocks) - 1

    def feature_shape(self, stage: int) -> tuple[int, ...]:
        """Shape (without batch) of the variable optimised at ``stage`` (0: the latent)."""
        if stage == 0:
            return (self.latent_dim,)
        return ((4 * self.width, 4, 4), (2 * self.width, 8, 8), (self.width, 16, 16))[stage - 1]

    def decode(self, h: torch.Tensor, stage: int = 0) -> torch.Tensor:
        """Image in [0, 1] (B, 3, 32, 32) from the stage's variable ``h`` (B, *feature_shape(stage))."""
        for block in self.blocks[stage:]:
            h = block(h)
        return (h + 1.0) * 0.5

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, latent_dim) -> (B, 3, 32, 32) in [0, 1]
        return self.decode(z, 0)


@torch.no_grad()
def dcgan_init(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """DCGAN initialisation in place from ``generator``: weights N(0, 0.02), norm scales N(1, 0.02),
    biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            m.weight.copy_(0.02 * torch.randn(m.weight.shape, generator=generator, device=generator.device))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            noise = torch.randn(m.weight.shape, generator=generator, device=generator.device)
            m.weight.copy_(1.0 + 0.02 * noise)
            m.bias.zero_()
            m.reset_running_stats()
    return module


def _state_dims(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(latent_dim, width) of a generator state dict, read from the first linear layer's shape."""
    weight = state.get("blocks.0.0.weight")
    if weight is None or weight.dim() != 2 or weight.shape[0] % 64:
        raise KeyError("blocks.0.0.weight")
    return int(weight.shape[1]), int(weight.shape[0]) // 64


def load_generator(device: torch.device | str = "cpu",
                   path: str | os.PathLike | None = None) -> DcganGenerator:
    """The shipped DCGAN generator, in eval mode and frozen, from ``path``
    (default ``assets/generator/dcgan-photos.pt``).

    Raises :class:`CheckpointError` when the file is missing (saying how to train it), unreadable, or
    not a state dict of this architecture.
    """
    path = Path(path) if path is not None else GENERATOR_PATH
    if not path.is_file():
        raise CheckpointError(f"GIFD's generator checkpoint {path} is missing: train it with "
                              f"'{TRAIN_COMMAND}' (about 15 minutes on a CPU) or give the path of one")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read the generator checkpoint {path} ({exc.__class__.__name__}); "
                              f"retrain it with '{TRAIN_COMMAND}'") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors; retrain it with '{TRAIN_COMMAND}'")
    try:
        latent_dim, width = _state_dims(state)
        with torch.device("meta"):
            gan = DcganGenerator(latent_dim=latent_dim, width=width)
        gan = gan.to_empty(device="cpu")
        gan.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0][:160]
        raise CheckpointError(f"{path} is not a DcganGenerator state dict ({reason}); "
                              f"retrain it with '{TRAIN_COMMAND}'") from exc
    gan = gan.to(device).eval()
    for p in gan.parameters():
        p.requires_grad_(False)
    return gan


# --------------------------------------------------------------------------------------------
# Projection onto the l1 ball


def project_l1_ball(v: torch.Tensor, center: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row of ``v`` onto the l1 ball of ``radius`` around ``center``.

    Sort-based (Duchi et al., 2008): with u the sorted absolute offsets and rho the largest j with
    u_j > (sum_{k<=j} u_k - radius) / j, the offset is soft-thresholded at
    theta = (sum_{k<=rho} u_k - radius) / rho. Rows already inside the ball come back unchanged.

    Args:
        v: (R, *shape) points, one per restart.
        center: the ball centres, broadcastable to ``v`` (e.g. (R, *shape) or (1, *shape)).
        radius: a float or an (R,) tensor of non-negative radii.

    Returns:
        (R, *shape) projected points.
    """
    if v.dim() == 0:
        raise ConfigError("project_l1_ball needs points of shape (R, ...), one row per restart")
    rows = v.shape[0]
    offset = (v - center).reshape(rows, -1)  # (R, n)
    r = torch.as_tensor(radius, dtype=offset.dtype, device=offset.device).reshape(-1)
    if r.numel() == 1:
        r = r.expand(rows)
    if r.numel() != rows or bool((r < 0).any()) or not bool(torch.isfinite(r).all()):
        raise ConfigError(f"radius must be one non-negative number or one per row ({rows}), got {radius!r}")
    magnitude = offset.abs()
    inside = magnitude.sum(dim=1) <= r  # (R,)
    u = torch.sort(magnitude, dim=1, descending=True).values  # (R, n)
    cumulative = torch.cumsum(u, dim=1)
    j = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=u.dtype)  # (n,)
    active = u * j > cumulative - r.unsqueeze(1)  # (R, n): true on a prefix
    rho = torch.where(active, j, torch.zeros_like(j)).amax(dim=1).clamp(min=1)  # (R,)
    at_rho = cumulative.gather(1, (rho.long() - 1).unsqueeze(1)).squeeze(1)
    theta = ((at_rho - r) / rho).clamp(min=0)  # (R,)
    shrunk = torch.sign(offset) * (magnitude - theta.unsqueeze(1)).clamp(min=0)
    projected = torch.broadcast_to(center, v.shape) + shrunk.view_as(v)
    return torch.where(inside.view(rows, *([1] * (v.dim() - 1))), v, projected)


# --------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class GifdConfig:
    """Settings of one GIFD attack.

    Args:
        loss: registered matching loss (GIFD uses ``cos``).
        stages: feature stages after the latent stage (1 to 3 for the shipped generator); the run has
            ``stages + 1`` stages in all.
        steps: optimisation steps per stage (the original uses 1,000).
        lr: peak Adam learning rate of every stage.
        warmup: fraction of a stage's steps over which the learning rate rises linearly from 0.
        rampdown: fraction of a stage's steps at its end over which it falls to 0 along a cosine.
        radii: l1-ball radius of each feature stage, as the mean absolute change per feature element
            (the ball's radius is this times the feature's size); non-decreasing with depth.
        restarts: candidates optimised together in every stage; the best is kept after each stage.
        restart_spread: in stages >= 1, candidates other than the kept one start at a random point
            at this fraction of the ball's radius (candidate 0 starts at the ball's centre).
        tv_weight: weight of the total-variation prior on the normalised image.
        image_norm_weight: weight of ||x||_2 / (H W) on the normalised image.
        label: ``known`` (the paper's assumption) or ``inferred`` (iDLG).
    """

    loss: str = "cos"
    stages: int = 3
    steps: int = 300
    lr: float = 0.02
    warmup: float = 0.05
    rampdown: float = 0.25
    radii: tuple[float, ...] = (0.05, 0.1, 0.2)
    restarts: int = 4
    restart_spread: float = 0.5
    tv_weight: float = 1e-4
    image_norm_weight: float = 1e-6
    label: str = "known"

    @property
    def total_steps(self) -> int:
        return (self.stages + 1) * self.steps

    def validated(self, max_stages: int = 3) -> GifdConfig:
        """Return ``self`` after checking every field; raise :class:`ConfigError` otherwise."""
        get_loss(self.loss)
        for name in ("stages", "steps", "restarts"):
            value = getattr(self, name)
            least = 0 if name == "stages" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be a {'non-negative' if name == 'stages' else 'positive'} "
                                  f"integer, got {value!r}")
        if self.stages > max_stages:
            raise ConfigError(f"the generator has {max_stages} feature stages; use stages <= {max_stages}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be positive, got {self.lr!r}")
        if not (0 <= self.warmup <= 1 and 0 <= self.rampdown <= 1):
            raise ConfigError(f"warmup and rampdown are fractions of a stage in [0, 1], got "
                              f"{self.warmup!r} and {self.rampdown!r}")
        radii = tuple(self.radii)
        if len(radii) < self.stages or any(not (r >= 0 and math.isfinite(r)) for r in radii):
            raise ConfigError(f"give one non-negative radius per feature stage ({self.stages}), "
                              f"got {radii!r}")
        if any(radii[i + 1] < radii[i] for i in range(len(radii) - 1)):
            raise ConfigError(f"radii must not shrink with depth, got {radii!r}")
        if not 0 <= self.restart_spread <= 1:
            raise ConfigError(f"restart_spread is a fraction of the ball's radius in [0, 1], got "
                              f"{self.restart_spread!r}")
        for name in ("tv_weight", "image_norm_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be zero or positive, got {value!r}")
        if self.label not in ("known", "inferred"):
            raise ConfigError(f"unknown label mode {self.label!r}: choose known or inferred")
        return self


def gifd_config_from(steps: int | None = None, restarts: int | None = None, *, lr: float | None = None,
                     loss: str | None = None, label: str | None = None, tv_weight: float | None = None,
                     stages: int | None = None, base: GifdConfig | None = None) -> GifdConfig:
    """Map the CLI's attack options onto a :class:`GifdConfig` (``None`` keeps ``base``'s value).

    ``steps`` is the *total* over all stages (split evenly, at least one per stage), so
    ``--steps S --restarts R`` costs about S x R victim-gradient evaluations, as for ``ig``.
    """
    config = base or GifdConfig()
    changes: dict = {}
    if stages is not None:
        changes["stages"] = stages
    n_stages = (stages if stages is not None else config.stages) + 1
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        changes["steps"] = max(1, steps // max(1, n_stages))
    for name, value in (("restarts", restarts), ("lr", lr), ("loss", loss), ("label", label),
                        ("tv_weight", tv_weight)):
        if value is not None:
            changes[name] = value
    return replace(config, **changes).validated()


@dataclass(frozen=True)
class GifdSnapshot(AttackSnapshot):
    """An :class:`AttackSnapshot` that also says which GIFD stage is running (0: the latent)."""

    stage: int = 0


@dataclass(frozen=True)
class GifdStage:
    """The kept result of one stage.

    ``image01`` is (C, H, W) in [0, 1] on the CPU; ``reconstruction`` is (1, C, H, W) normalised.
    ``start_loss`` is the matching loss where the stage started (stage 0: the best random latent;
    later stages: the previous stage's kept result, the centre of the ball), ``matching_loss`` the
    kept restart's (the lowest seen in the stage), ``restart_losses`` each restart's lowest.
    """

    index: int
    name: str
    matching_loss: float
    start_loss: float
    image01: torch.Tensor = field(repr=False)
    reconstruction: torch.Tensor = field(repr=False)
    restart_losses: tuple[float, ...]
    kept_restart: int
    steps: int


@dataclass(frozen=True)
class GifdResult:
    """Outcome of a GIFD attack: an :class:`AttackResult` for the best stage, plus every stage.

    Attribute reads that :class:`GifdResult` lacks (``reconstruction``, ``matching_loss``, ...) are
    answered by ``attack``, so it can stand in for an :class:`AttackResult`.
    """

    attack: AttackResult
    stages: tuple[GifdStage, ...]
    best_stage: int | None
    gradient_evaluations: int

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "attack":
            raise AttributeError(name)
        return getattr(self.attack, name)


def stage_name(stage: int) -> str:
    return "latent" if stage == 0 else f"layer {stage}"


def learning_rate_factor(step: int, steps: int, warmup: float, rampdown: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``steps``: a linear warm-up over
    the first ``warmup`` fraction, a cosine ramp-down to 0 over the last ``rampdown`` fraction."""
    t = step / steps
    factor = 1.0
    if rampdown > 0:
        factor = 0.5 - 0.5 * math.cos(math.pi * min(1.0, (1.0 - t) / rampdown))
    if warmup > 0:
        factor *= min(1.0, (step + 1) / (warmup * steps))
    return factor


# --------------------------------------------------------------------------------------------
# The attack


class GifdRun(VictimRun):
    """One GIFD attack, as an iterator of :class:`GifdSnapshot`; the outcome lands in ``.result``.

    Args:
        model: the global model (never modified; a private eval-mode copy is used).
        update: the client's shared gradient and label (a 3x32x32 image).
        config: the GIFD settings.
        info: the victim's dataset (its normalisation maps the generator's images to model inputs).
        generator: source of all randomness (initial latents, restart offsets).
        gan: the DCGAN generator (never modified; a frozen copy is used); default :func:`load_generator`.
        device: where to run (defaults to CPU).
        snapshot_every: yield a snapshot every this many steps (and at each stage's first and last step).
    """

    def __init__(self, model: nn.Module | GradientOracle, update: ClientUpdate, config: GifdConfig,
                 info: DatasetInfo, *, generator: torch.Generator, gan: DcganGenerator | None = None,
                 device: torch.device | str = "cpu", snapshot_every: int = 10):
        source = gan if gan is not None else load_generator(torch.device(device))
        self.gan = copy.deepcopy(source).to(torch.device(device)).eval()
        for p in self.gan.parameters():
            p.requires_grad_(False)
        self.config = config.validated(self.gan.num_feature_stages)
        image_shape = tuple(update.image_shape)
        if image_shape != (3, 32, 32):
            raise ConfigError(f"GIFD's generator makes 3x32x32 images; this image is "
                              f"{'x'.join(map(str, image_shape))}: use a 32x32 RGB dataset "
                              f"(photos, faces, cifar10)")
        self._bind(model, update, self.config.label, info, generator, device, snapshot_every)
        self.gan = self.gan.to(self.oracle.dtype)  # e.g. float64 when handed a float64 oracle
        self.loss = get_loss(self.config.loss)
        self.result: GifdResult | None = None
        self.evaluations = 0
        self._batched = vmap(grad_and_value(self._image_objective(), has_aux=True))

    @property
    def total_steps(self) -> int:
        return self.config.total_steps

    def _image_objective(self):
        g_fn = self.oracle.gradient_fn(self.label)
        loss, g_star, layout = self.loss, self.g_star, self.oracle.layout
        tv, norm_weight = self.config.tv_weight, self.config.image_norm_weight

        def objective(x: torch.Tensor):  # x: (C, H, W) normalised -> (total, matching)
            matching = loss(g_fn(x), g_star, layout)
            total = matching
            if tv > 0:
                total = total + tv * total_variation(x)
            if norm_weight > 0:
                area = x.shape[-1] * x.shape[-2]
                total = total + norm_weight * torch.sqrt(torch.sum(x * x) + 1e-30) / area
            return total, matching

        return objective

    def _evaluate(self, stage: int, h: torch.Tensor):
        """Gradient of the total loss w.r.t. ``h`` (R, *shape), the matching losses (R,) (NaN where not
        finite) and the images (R, C, H, W) in [0, 1]."""
        leaf = h.detach().requires_grad_(True)
        with torch.enable_grad():
            image01 = self.gan.decode(leaf, stage)  # (R, 3, 32, 32)
            x = self.info.normalize(image01)
        grad_x, (_, matching) = self._batched(x.detach())  # (R, C, H, W), (R,)
        bad = ~torch.isfinite(matching) | ~torch.isfinite(grad_x).flatten(1).all(dim=1)
        grad_x = torch.where(bad.view(-1, 1, 1, 1), torch.zeros_like(grad_x), grad_x)
        (grad_h,) = torch.autograd.grad(x, leaf, grad_x)
        self.evaluations += h.shape[0]
        matching = torch.where(bad, torch.full_like(matching, math.nan), matching.detach())
        return grad_h, matching, image01.detach()

    def _start(self, stage: int, kept: torch.Tensor | None):
        """Starting candidates (R, *shape), the ball centre (1, *shape) and its radius for ``stage``."""
        c, rng = self.config, self.generator
        shape = (c.restarts, *self.gan.feature_shape(stage))
        if stage == 0:
            z = torch.randn(shape, generator=rng, device=rng.device).to(self.device, self.oracle.dtype)
            return z, z.clone(), torch.zeros(())
        with torch.no_grad():
            center = self.gan.blocks[stage - 1](kept.unsqueeze(0))  # (1, *shape)
        radius = torch.tensor(c.radii[stage - 1] * center[0].numel(), dtype=center.dtype, device=self.device)
        h = center.expand(shape).clone()
        if c.restarts > 1 and c.restart_spread > 0:
            noise = torch.randn((c.restarts - 1, *shape[1:]), generator=rng, device=rng.device).to(h)
            l1 = noise.flatten(1).abs().sum(dim=1).clamp(min=1e-12).view(-1, *([1] * (noise.dim() - 1)))
            h[1:] = center + noise * (c.restart_spread * radius / l1)
        return h, center, radius

    def _constrain(self, stage: int, h: torch.Tensor, center: torch.Tensor, radius: torch.Tensor) -> None:
        """In place: latent back to its initial norm (stage 0), or feature into its l1 ball."""
        with torch.no_grad():
            if stage == 0:
                scale = center.flatten(1).norm(dim=1) / h.flatten(1).norm(dim=1).clamp(min=1e-12)
                h.mul_(scale.view(-1, *([1] * (h.dim() - 1))))
            else:
                h.copy_(project_l1_ball(h, center, radius))

    def _snapshot(self, step: int, stage: int, image01: torch.Tensor, losses: torch.Tensor) -> GifdSnapshot:
        finite = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, math.inf))
        best = int(torch.argmin(finite))
        return GifdSnapshot(step, self.total_steps, float(finite[best]), tuple(float(v) for v in losses),
                            image01[best].float().cpu(), None, stage)

    def __iter__(self) -> Iterator[GifdSnapshot]:
        c = self.config
        start = time.perf_counter()
        stages: list[GifdStage] = []
        kept: torch.Tensor | None = None
        steps_done = 0
        for stage in range(c.stages + 1):
            if self._cancel.is_set():
                break
            h, center, radius = self._start(stage, kept)
            h.requires_grad_(True)
            optimizer = torch.optim.Adam([h], lr=c.lr)
            best_loss = torch.full((c.restarts,), math.inf, device=self.device, dtype=h.dtype)
            best_h = h.detach().clone()
            best_image = torch.zeros((c.restarts, *self.update.image_shape), device=self.device, dtype=h.dtype)
            start_loss, stage_steps = math.inf, 0
            for t in range(c.steps + 1):  # the last pass only scores the final candidates
                grad_h, matching, image01 = self._evaluate(stage, h)
                finite = torch.where(torch.isfinite(matching), matching, torch.full_like(matching, math.inf))
                if t == 0:  # stage 0: the best random latent; later: the kept result (candidate 0)
                    start_loss = float(finite.min() if stage == 0 else finite[0])
                better = finite < best_loss
                best_loss = torch.where(better, finite, best_loss)
                mask = better.view(-1, *([1] * (h.dim() - 1)))
                best_h = torch.where(mask, h.detach(), best_h)
                best_image = torch.where(better.view(-1, 1, 1, 1), image01, best_image)
                if t == c.steps or self._cancel.is_set():
                    break
                for group in optimizer.param_groups:
                    group["lr"] = c.lr * learning_rate_factor(t, c.steps, c.warmup, c.rampdown)
                h.grad = grad_h
                optimizer.step()
                self._constrain(stage, h, center, radius)
                steps_done += 1
                stage_steps += 1
                self._record(steps_done - 1, matching)
                if t == 0 or stage_steps % self.snapshot_every == 0 or stage_steps == c.steps:
                    yield self._snapshot(stage * c.steps + stage_steps, stage, image01, matching)
            if not bool(torch.isfinite(best_loss).any()):
                break  # every candidate diverged: later stages have nothing to start from
            index = int(torch.argmin(best_loss))
            kept = best_h[index].detach()
            image = best_image[index].float().cpu()
            restart_losses = tuple(v if math.isfinite(v) else math.nan for v in best_loss.tolist())
            stages.append(GifdStage(stage, stage_name(stage), float(best_loss[index]), start_loss, image,
                                    self.info.normalize(best_image[index:index + 1]).detach(),
                                    restart_losses, index, stage_steps))
        self.result = self._finish(stages, steps_done, time.perf_counter() - start)

    def _finish(self, stages: list[GifdStage], steps_done: int, seconds: float) -> GifdResult:
        restarts = self.config.restarts
        if not stages:
            attack = AttackResult(None, math.nan, (math.nan,) * restarts, (True,) * restarts, None,
                                  self.label, int(self.update.label), steps_done, seconds,
                                  self._cancel.is_set(), tuple(self._history))
            return GifdResult(attack, (), None, self.evaluations)
        best = min(range(len(stages)), key=lambda i: stages[i].matching_loss)
        chosen = stages[best]
        diverged = tuple(not math.isfinite(v) for v in chosen.restart_losses)
        attack = AttackResult(chosen.reconstruction, chosen.matching_loss, chosen.restart_losses, diverged,
                              chosen.kept_restart, self.label, int(self.update.label), steps_done, seconds,
                              self._cancel.is_set(), tuple(self._history))
        return GifdResult(attack, tuple(stages), chosen.index, self.evaluations)


def run_gifd(model: nn.Module | GradientOracle, update: ClientUpdate, info: DatasetInfo,
             config: GifdConfig, *, generator: torch.Generator, device: torch.device | str = "cpu",
             gan: DcganGenerator | None = None) -> GifdResult:
    """Run GIFD to the end and return its :class:`GifdResult`.

    Note the argument order (``info`` before ``config``, unlike :func:`~lavp_core.attacks.run_attack`);
    ``generator`` is the ``torch.Generator`` of all random draws, ``gan`` the DCGAN prior
    (default :func:`load_generator`).
    """
    if not isinstance(config, GifdConfig) or not isinstance(info, DatasetInfo):
        raise ConfigError("run_gifd takes (model, update, info: DatasetInfo, config: GifdConfig); "
                          f"got info={type(info).__name__}, config={type(config).__name__}")
    run = GifdRun(model, update, config, info, generator=generator, gan=gan, device=device,
                  snapshot_every=max(1, config.total_steps))
    for _ in run:
        pass
    return run.result


DEFAULT_GIFD = GifdConfig()


class GenerativeAttack(AttackKind):
    """GIFD: optimisation in a generator's latent and feature spaces, stage by stage."""

    name = "generative"
    summary = "gradient matching through a generative image prior (latent, then feature stages)"
    studied = False
    settings = ("loss", "steps", "restarts", "lr", "tv_weight", "label")

    def defaults(self, preset: AttackPreset) -> AttackRequest:
        c = preset.config
        return AttackRequest(preset.name, loss=c.loss, steps=c.total_steps, restarts=c.restarts, lr=c.lr,
                             tv_weight=c.tv_weight, label=c.label)

    def start(self, preset, model, image, label, info, request, *, generator, device, snapshot_every):
        oracle = GradientOracle(model, device=device)
        update = client_update(oracle, image, label)
        config = gifd_config_from(steps=request.steps, restarts=request.restarts, lr=request.lr,
                                  loss=request.loss, label=request.label, tv_weight=request.tv_weight,
                                  base=preset.config)
        run = GifdRun(oracle, update, config, info, generator=generator, device=device,
                      snapshot_every=snapshot_every)
        return StreamedRun(preset, run, lambda result: {"stages": result.stages, "best_stage": result.best_stage})


register_kind(GenerativeAttack())
register_preset(AttackPreset(
    "gifd",
    "GIFD: DCGAN prior trained on photos; latent stage then 3 feature stages in growing l1 balls, cosine "
    f"+ TV 1e-4 + image norm, Adam with warm-up and cosine ramp-down, {DEFAULT_GIFD.restarts} restarts, "
    f"{DEFAULT_GIFD.total_steps} steps in all",
    "generative", DEFAULT_GIFD))
