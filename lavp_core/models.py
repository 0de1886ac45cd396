"""Model zoo: a registry of classifier architectures and their weights.

``create_model(name, num_classes, weights=...)`` builds an architecture with

* ``weights="random"`` and a ``seed``: parameters drawn from an explicit ``torch.Generator``
  (identical on every machine; the global generator is never touched), or
* ``weights="trained"``: the bundled checkpoint ``assets/checkpoints/<arch>-<dataset>.pt``, or
* ``weights="trained@E"``: the snapshot a training run kept after epoch ``E`` (``E = 0``: the
  initialisation it started from), ``assets/checkpoints/<arch>-<dataset>-epoch<E>.pt``, or
* ``weights=<path>``: any checkpoint file, loaded with ``torch.load(..., weights_only=True)``.
  A checkpoint that does not fit the architecture is refused with the keys and shapes that differ.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError, ConfigError, ModelError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CHECKPOINT_DIR = ASSETS / "checkpoints"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    builder: Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> module
    input_size: int  # side of the square input the architecture is designed for
    init: str  # "dlg-uniform" (U(-0.5, 0.5), DLG's LeNet) or "default" (PyTorch-style fan-in)


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, description: str, input_size: int, init: str = "default"):
    """Decorator: register ``builder(num_classes, in_channels) -> nn.Module`` under ``name``."""

    def wrap(builder):
        _MODELS[name] = ModelSpec(name, description, builder, input_size, init)
        return builder

    return wrap


def list_models() -> list[ModelSpec]:
    """All registered architectures, in registration order."""
    return list(_MODELS.values())


def model_spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise ConfigError(f"unknown architecture {name!r}: choose one of {', '.join(_MODELS)}")
    return _MODELS[name]


# --------------------------------------------------------------------------------------------
# Architectures for 32x32 inputs


class LeNet(nn.Module):
    """DLG's LeNet: three 5x5 convolutions (12 channels, strides 2, 2, 1) with sigmoids, one linear layer."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, 5, padding=2, stride=2), nn.Sigmoid(),  # (12, 16, 16)
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),  # (12, 8, 8)
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),  # (12, 8, 8)
        )
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x):  # (B, C, 32, 32) -> (B, classes)
        return self.fc(self.body(x).flatten(1))


class AlexNetCifar(nn.Module):
    """A CIFAR-sized AlexNet: five convolutions (three max-pools) and a three-layer classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 48, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (48, 16, 16)
            nn.Conv2d(48, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (96, 8, 8)
            nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (96, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Linear(96 * 16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class VGG9(nn.Module):
    """VGG9: six 3x3 convolutions with batch norm (widths 32-64-128-128-256-256, four max-pools), three linear."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        layers, channels = [], in_channels
        for width in (32, "M", 64, "M", 128, 128, "M", 256, 256, "M"):
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)  # (256, 2, 2)
        self.classifier = nn.Sequential(
            nn.Linear(256 * 4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """CIFAR ResNet-8: a 3x3 stem and one basic block per stage (16, 32, 64 channels), average pool, linear."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(out.mean(dim=(2, 3)))


register_model("lenet", "DLG's sigmoid LeNet (12 channels, 5x5 convs, strides 2,2,1)", 32, "dlg-uniform")(LeNet)
register_model("alexnet", "CIFAR-sized AlexNet (5 convs, 3 pools, 3 linear)", 32)(AlexNetCifar)
register_model("vgg9", "VGG9 with batch norm (6 convs, 3 linear)", 32)(VGG9)
register_model("resnet8", "CIFAR ResNet-8 (one basic block per stage)", 32)(ResNet8)


@register_model("resnet18", "torchvision ResNet-18 (architecture only), 224x224", 224)
def _resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


@register_model("shufflenet", "torchvision ShuffleNet V2 x1.0 (architecture only), 224x224", 224)
def _shufflenet(num_classes: int, in_channels: int = 3) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise ConfigError("shufflenet takes 3-channel images only")
    return torchvision.models.shufflenet_v2_x1_0(weights=None, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# Weights


def _fan_in(tensor: torch.Tensor) -> int:
    return int(tensor.shape[1] * math.prod(tensor.shape[2:])) if tensor.dim() > 1 else int(tensor.shape[0])


@torch.no_grad()
def init_random(model: nn.Module, generator: torch.Generator, scheme: str = "default") -> nn.Module:
    """Fill every parameter and buffer of ``model`` in place from ``generator``.

    ``scheme="dlg-uniform"`` draws everything from U(-0.5, 0.5) as DLG does; ``"default"`` uses
    PyTorch's fan-in uniform bound 1/sqrt(fan_in) for weights and biases of convolutions and linear
    layers, ones/zeros for normalisation layers. Buffers get their standard values.
    """
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        weight = own.get("weight")
        bound = 1.0 / math.sqrt(max(1, _fan_in(weight))) if weight is not None else 1.0
        for name, param in own.items():
            if scheme == "dlg-uniform":
                param.copy_(torch.rand(param.shape, generator=generator, device=generator.device) - 0.5)
            elif is_norm:
                param.fill_(1.0 if name == "weight" else 0.0)
            else:
                draw = torch.rand(param.shape, generator=generator, device=generator.device)
                param.copy_((2 * draw - 1) * bound)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
            module.num_batches_tracked.zero_()
    return model


def _build(spec: ModelSpec, num_classes: int, in_channels: int) -> nn.Module:
    # Construct on the meta device so construction consumes no global randomness, then allocate.
    with torch.device("meta"):
        model = spec.builder(num_classes, in_channels)
    return model.to_empty(device="cpu")


def trained_checkpoint_path(arch: str, dataset: str) -> Path:
    """Where ``weights='trained'`` looks: ``assets/checkpoints/<arch>-<dataset>.pt``."""
    return CHECKPOINT_DIR / f"{arch}-{dataset}.pt"


def snapshot_path(checkpoint: str | os.PathLike, epoch: int) -> Path:
    """The snapshot of epoch ``epoch`` kept beside ``checkpoint``: ``<stem>-epoch<E>.pt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}-epoch{int(epoch)}.pt")


def snapshot_epoch(weights: str) -> int | None:
    """The epoch named by ``weights="trained@E"`` (``None`` for any other weights); ``ConfigError`` for
    a malformed one."""
    if not weights.startswith("trained@"):
        return None
    text = weights.split("@", 1)[1]
    if not text.isdigit():
        raise ConfigError(f"weights {weights!r}: after 'trained@' give an epoch number, e.g. trained@5")
    return int(text)


def available_snapshots(arch: str, dataset: str) -> list[int]:
    """Epochs with a bundled snapshot of ``arch`` trained on ``dataset``, ascending."""
    stem = trained_checkpoint_path(arch, dataset).stem
    found = []
    for path in CHECKPOINT_DIR.glob(f"{stem}-epoch*.pt"):
        tail = path.stem[len(stem) + len("-epoch"):]
        if tail.isdigit():
            found.append(int(tail))
    return sorted(found)


def checkpoint_for(name: str, weights: str, dataset: str | None) -> Path:
    """The checkpoint file that ``weights`` (``trained``, ``trained@E`` or a path) names for ``name``."""
    if not weights.startswith("trained"):
        return Path(weights)
    if dataset is None:
        raise ConfigError(f"weights={weights!r} needs the dataset the checkpoint was trained on")
    path = trained_checkpoint_path(name, dataset)
    epoch = snapshot_epoch(weights)
    if epoch is not None:
        snapshot = snapshot_path(path, epoch)
        if not snapshot.is_file():
            have = available_snapshots(name, dataset)
            raise CheckpointError(
                f"no snapshot of {name} on {dataset} at epoch {epoch} ({snapshot} is missing); "
                + (f"available: {', '.join(f'trained@{e}' for e in have)}" if have else
                   f"keep some with 'python -m lavp_core train --arch {name} --dataset {dataset} --snapshots 0,1,5'"))
        return snapshot
    if weights != "trained":
        raise ConfigError(f"unknown weights {weights!r}: use random, trained, trained@EPOCH or a checkpoint path")
    if not path.is_file():
        raise CheckpointError(
            f"no trained checkpoint for {name} on {dataset} ({path} is missing); train one with "
            f"'python -m lavp_core train --arch {name} --dataset {dataset} --out {path}' "
            f"or use --weights random")
    return path


def read_state_dict(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint (a state dict, or a dict with a ``state_dict`` entry) with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: give the path of a .pt file "
                              f"or use --weights random")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_failure(exc)}; give a file saved with "
                              f"torch.save(model.state_dict(), path)") from exc
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors; save one with "
                              f"torch.save(model.state_dict(), path)")
    bad = [name for name, tensor in state.items()
           if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all())]
    if bad:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite values in {names}: a model with them "
                              f"computes nothing meaningful (training diverged?); retrain it, or use another "
                              f"checkpoint")
    return state


def _load_failure(exc: Exception, limit: int = 200) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one short clause: the Python object a
    pickle asked for (what a malicious checkpoint does), else the first sentence of the error, shortened
    at a word boundary."""
    text = " ".join(str(exc).split())
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"it asks to load the Python object {found.group(1)}, which a checkpoint of weights never "
                f"holds and which safe loading (weights_only=True) refuses (loading it could run code)")
    found = re.search(r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)", text)
    if found:
        text = f"it is not a checkpoint of weights (the safe unpickler stopped at: {found.group(1)})"
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".") or exc.__class__.__name__
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    return f"{exc.__class__.__name__}: {first}"


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Load ``state`` into ``model`` only if every key and shape fits; otherwise say what differs."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:5]}{' …' if len(shapes) > 5 else ''}")
        raise CheckpointError(f"checkpoint {source} does not fit architecture {arch!r}: "
                              + "; ".join(parts) + ". Pick the architecture it was trained for.")
    model.load_state_dict(state)


def create_model(name: str, num_classes: int, *, weights: str = "random", seed: int = 0,
                 in_channels: int = 3, dataset: str | None = None,
                 device: torch.device | str = "cpu") -> nn.Module:
    """Build a registered architecture with its weights, in eval mode, on ``device``.

    Args:
        name: registry name (see :func:`list_models`).
        num_classes: size of the output layer.
        weights: ``"random"`` (drawn from ``seed``), ``"trained"`` (bundled checkpoint for
            ``dataset``), ``"trained@E"`` (its training run's snapshot after epoch E) or the path of a
            checkpoint file.
        seed: seed of the ``torch.Generator`` used for random weights.
        in_channels: input channels (3 for every bundled dataset).
        dataset: dataset name, needed for ``weights="trained"``.
        device: where the model lives.
    """
    spec = model_spec(name)
    model = _build(spec, num_classes, in_channels)
    if weights == "random":
        init_random(model, torch.Generator(device="cpu").manual_seed(int(seed)), spec.init)
    else:
        path = checkpoint_for(name, weights, dataset)
        init_random(model, torch.Generator(device="cpu").manual_seed(0), spec.init)  # no garbage memory
        load_state_checked(model, read_state_dict(path), str(path), name)
    return model.to(device).eval()


def check_input_fits(model: nn.Module, image_shape: tuple[int, int, int], name: str = "model") -> None:
    """Raise :class:`ModelError` unless ``model`` maps a (1, C, H, W) input to (1, classes) logits."""
    probe = next(model.parameters())
    with torch.no_grad():
        try:
            out = torch.func.functional_call(model, dict(model.named_parameters()) | dict(model.named_buffers()),
                                             (torch.zeros((1, *image_shape), device=probe.device,
                                                          dtype=probe.dtype),))
        except RuntimeError as exc:
            raise ModelError(f"{name} cannot take a {image_shape[0]}x{image_shape[1]}x{image_shape[2]} input "
                             f"({str(exc).splitlines()[0][:120]}); pick an architecture made for this "
                             f"resolution") from exc
    if out.dim() != 2 or out.shape[0] != 1:
        raise ModelError(f"{name} returns shape {tuple(out.shape)} for one image; a classifier must "
                         f"return (1, classes) logits")


# --------------------------------------------------------------------------------------------
# Architectures the analytical R-CONV attack inverts (see lavp_core/analytic.py)


class RConvNet(nn.Module):
    """R-CONV's family: biased convolutions with element-wise activations, no pooling, one biased linear.

    The first layer (3 -> 16, 5x5, stride 2) has too few gradient constraints (400 per channel for
    1,024 unknowns), so its input comes from its forward constraints, which its invertible LeakyReLU
    allows; the later layers are recovered from a fraction of their gradient constraints.
    """

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5, padding=2, stride=2), nn.LeakyReLU(0.2),  # (16, 16, 16)
            nn.Conv2d(16, 32, 5, padding=2, stride=2), nn.LeakyReLU(0.2),  # (32, 8, 8)
            nn.Conv2d(32, 32, 3, padding=1, stride=1), nn.ReLU(),  # (32, 8, 8)
        )
        self.fc = nn.Linear(32 * 8 * 8, num_classes)

    def forward(self, x):  # (B, C, 32, 32) -> (B, classes)
        return self.fc(self.body(x).flatten(1))


class RConvMLP(nn.Module):
    """A fully connected network R-CONV inverts: two biased hidden layers (sigmoid), biased output."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * 32 * 32, 256), nn.Sigmoid(),
            nn.Linear(256, 128), nn.Sigmoid(), nn.Linear(128, num_classes),
        )

    def forward(self, x):  # (B, C, 32, 32) -> (B, classes)
        return self.net(x)


register_model("cnn-rconv", "R-CONV's family: 3 biased convs (LeakyReLU, LeakyReLU, ReLU), no pooling, "
               "one linear layer", 32, "dlg-uniform")(RConvNet)
register_model("mlp-rconv", "fully connected: 3 biased linear layers with sigmoids", 32,
               "dlg-uniform")(RConvMLP)
