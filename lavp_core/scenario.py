"""A scenario: one client image, its label, and the global model the server shares.

The CLI, the study runner and the app all describe "which image on which model" with the same
frozen :class:`ScenarioConfig` and turn it into tensors with :func:`build_scenario`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .data import DatasetInfo, load_dataset, load_image
from .errors import ConfigError
from .models import check_input_fits, create_model, model_spec


@dataclass(frozen=True)
class ScenarioConfig:
    """Which image and which model.

    Args:
        dataset: registry name of the dataset (also fixes normalisation and class count).
        index: index into the split (ignored when ``image`` is given).
        arch: registry name of the architecture.
        weights: ``"random"``, ``"trained"`` or a checkpoint path.
        seed: seed for random weights.
        split: ``"val"`` (default) or ``"train"``.
        image: optional path of a user image (PNG/JPEG), resized and centre-cropped to the
            dataset's resolution and normalised with the dataset's statistics.
        label: label of a user image (default 0); for dataset images the true label is used.
        data_root: folder of on-disk datasets (CIFAR, image folders).
        download: CIFAR only: download into ``data_root`` when missing (only when asked).
    """

    dataset: str = "photos"
    index: int = 0
    arch: str = "lenet"
    weights: str = "random"
    seed: int = 0
    split: str = "val"
    image: str | None = None
    label: int | None = None
    data_root: str | None = None
    download: bool = False


@dataclass
class Scenario:
    config: ScenarioConfig
    info: DatasetInfo
    model: nn.Module
    image01: torch.Tensor  # (1, C, H, W) in [0, 1]
    image: torch.Tensor  # (1, C, H, W) normalised: what the model consumes
    label: int
    description: str


def build_model(config: ScenarioConfig, info: DatasetInfo, device: torch.device | str = "cpu") -> nn.Module:
    """The scenario's model, in eval mode, checked against the dataset's input shape."""
    model = create_model(config.arch, info.num_classes, weights=config.weights, seed=config.seed,
                         in_channels=info.image_shape[0], dataset=info.name, device=device)
    check_input_fits(model, info.image_shape, config.arch)
    return model


def build_scenario(config: ScenarioConfig, device: torch.device | str = "cpu",
                   image_bytes: bytes | None = None, resolution: int | None = None,
                   model: nn.Module | None = None) -> Scenario:
    """Load the image (dataset index, a file, or uploaded bytes) and build the model.

    ``model``, when given, is used instead of building one from ``config`` (the app passes its cached
    copy of the same ``arch``/``weights``/``seed``); it is checked against the dataset's input shape.
    """
    if resolution is None and config.dataset == "imagefolder":
        resolution = model_spec(config.arch).input_size
    dataset = load_dataset(config.dataset, config.split, root=config.data_root, download=config.download,
                           resolution=resolution)
    info = dataset.info
    if image_bytes is not None or config.image is not None:
        source = image_bytes if image_bytes is not None else config.image
        image01 = load_image(source, size=info.image_shape[1], channels=info.image_shape[0])
        label = 0 if config.label is None else int(config.label)
        if not 0 <= label < info.num_classes:
            raise ConfigError(f"label {label} is out of range for {info.name} "
                              f"({info.num_classes} classes: 0..{info.num_classes - 1})")
        description = ("uploaded image" if image_bytes is not None else os.path.basename(str(config.image)))
        description += f" (label {label}: {info.class_names[label]})"
    else:
        image01, label = dataset[config.index]
        description = dataset.describe(config.index)
    if model is None:
        model = build_model(config, info, device)
    else:
        check_input_fits(model, info.image_shape, config.arch)
    image01 = image01.unsqueeze(0).to(device)
    return Scenario(config, info, model, image01, info.normalize(image01), int(label), description)
