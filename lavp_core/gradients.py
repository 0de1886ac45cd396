"""The client's weight gradient g_w(x, y), computed functionally, and iDLG label inference.

:class:`GradientOracle` wraps a private eval-mode copy of a classifier and exposes
``gradient(x, label)``: the flattened gradient of the cross-entropy loss with respect to all the
model's parameters, through ``torch.func``. The model handed in is never modified: no ``.grad`` is
written, its training flag is not touched, its parameters are not moved.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

from .errors import ConfigError, ModelError


@dataclass(frozen=True)
class ParamLayout:
    """Where each parameter tensor sits in the flattened gradient vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[slice, ...]
    size: int

    @classmethod
    def of(cls, named: dict[str, torch.Tensor]) -> ParamLayout:
        names, shapes, slices, start = [], [], [], 0
        for name, tensor in named.items():
            names.append(name)
            shapes.append(tuple(tensor.shape))
            slices.append(slice(start, start + tensor.numel()))
            start += tensor.numel()
        return cls(tuple(names), tuple(shapes), tuple(slices), start)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat (n,) vector back into named tensors."""
        return {n: flat[s].view(shape) for n, shape, s in zip(self.names, self.shapes, self.slices)}


@dataclass(frozen=True)
class ClientUpdate:
    """What the client shares with the server: the flattened weight gradient g* (n,).

    ``label`` is the client's true label; attacks use it when the label is assumed known (the
    paper's setting) and infer their own otherwise.
    """

    gradient: torch.Tensor  # (n,)
    label: int
    image_shape: tuple[int, int, int]


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


class EvalBatchNorm(nn.Module):
    """Batch normalisation in eval mode written as the per-channel affine map it is:
    y = x·s + (β − μ·s), s = γ / sqrt(σ² + ε), with the running statistics μ, σ² fixed.

    The same function of x, γ and β as ``nn.BatchNorm*d`` in eval mode, with the same parameter and
    buffer names (so the flattened gradient's layout is unchanged), but its first and second
    derivatives are a multiply and an add instead of the generic batch-norm backward kernels, which
    makes double backpropagation (every attack step, every Hessian product) about 20% faster on
    ``resnet8``. Only the private copy inside :class:`GradientOracle` is converted.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        if getattr(bn, "num_batches_tracked", None) is not None:
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.eps = float(bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = self.weight * scale
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = self.bias + shift
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)


def _affine_batch_norms(module: nn.Module) -> None:
    """Replace, in place, every eval-mode batch norm with running statistics by :class:`EvalBatchNorm`."""
    for name, child in module.named_children():
        if (isinstance(child, nn.modules.batchnorm._BatchNorm) and child.track_running_stats
                and child.running_mean is not None and child.running_var is not None):
            setattr(module, name, EvalBatchNorm(child))
        else:
            _affine_batch_norms(child)


class GradientOracle:
    """A frozen functional view of a classifier for computing weight gradients.

    One oracle serves one thread at a time: ``functional_call`` swaps the private module's tensors
    while a forward pass runs, so two threads evaluating the same oracle at once interfere
    (torch.func then fails with an internal assertion). Build one oracle per thread; each holds its
    own copy of the model. Every attack and proxy in this package does.

    Args:
        model: any ``nn.Module`` classifier mapping (1, C, H, W) to (1, classes) logits.
        device: where to compute; defaults to the model's device.
        dtype: parameter dtype for the private copy (float64 for the analytical attack).
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        if not isinstance(model, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
        first = next(iter(model.parameters()), None)
        if first is None:
            raise ModelError("the model has no parameters, so it has no gradient to invert")
        self.device = torch.device(device) if device is not None else first.device
        frozen = copy.deepcopy(model).eval()
        _affine_batch_norms(frozen)
        for p in frozen.parameters():
            p.grad = None
            p.requires_grad_(False)
        frozen = frozen.to(self.device)
        if dtype is not None:
            frozen = frozen.to(dtype)
        self.module = frozen
        self.params = {n: p.detach() for n, p in frozen.named_parameters()}
        self.buffers = {n: b.detach() for n, b in frozen.named_buffers()}
        self.layout = ParamLayout.of(self.params)
        self.dtype = next(iter(self.params.values())).dtype

    def logits(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, classes) for a normalised batch x (B, C, H, W)."""
        return functional_call(self.module, (params or self.params, self.buffers), (x,))

    def num_classes(self, image_shape: tuple[int, int, int]) -> int:
        with torch.no_grad():
            out = self.logits(torch.zeros((1, *image_shape), device=self.device, dtype=self.dtype))
        return int(out.shape[-1])

    def check(self, image: torch.Tensor, label: int) -> int:
        """Validate a (1, C, H, W) image and an integer label for this model; return the class count."""
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] != 1:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ModelError(f"expected one normalised image of shape (1, C, H, W), got {shape}")
        try:
            with torch.no_grad():
                out = self.logits(image.to(self.device, self.dtype))
        except RuntimeError as exc:
            raise ModelError(f"the model cannot take an image of shape {tuple(image.shape)} "
                             f"({str(exc).splitlines()[0][:120]})") from exc
        if out.dim() != 2 or out.shape[0] != 1:
            raise ModelError(f"the model returns shape {tuple(out.shape)} for one image; a classifier "
                             f"must return (1, classes) logits")
        classes = int(out.shape[1])
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
            raise ConfigError(f"label {label!r} is out of range: the model has {classes} classes "
                              f"(0..{classes - 1})")
        return classes

    def gradient_fn(self, label: int | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x (C, H, W) -> g_w(x, label) (n,)``, composable with ``vmap``, ``jvp``, ``vjp``."""
        target = torch.as_tensor(label, device=self.device).reshape(1).long()

        def cross_entropy(params, x):  # x: (C, H, W)
            return F.cross_entropy(self.logits(x.unsqueeze(0), params), target)

        param_grad = grad(cross_entropy)

        def g(x: torch.Tensor) -> torch.Tensor:
            return flatten(param_grad(self.params, x))

        return g

    def gradient(self, image: torch.Tensor, label: int) -> torch.Tensor:
        """Flattened weight gradient g_w(x, y) (n,) for a normalised image (1, C, H, W) or (C, H, W)."""
        x = image[0] if image.dim() == 4 else image
        return self.gradient_fn(label)(x.to(self.device, self.dtype)).detach()


def client_update(model: nn.Module | GradientOracle, image: torch.Tensor, label: int) -> ClientUpdate:
    """The gradient a client with one normalised image (1, C, H, W) and ``label`` would share."""
    oracle = model if isinstance(model, GradientOracle) else GradientOracle(model)
    oracle.check(image, label)
    return ClientUpdate(oracle.gradient(image, label), int(label), tuple(image.shape[1:]))


def _last_linear_name(oracle: GradientOracle, num_classes: int) -> str:
    last = None
    for name, module in oracle.module.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            last = name
    if last is None:
        raise ConfigError("iDLG label inference needs a final nn.Linear layer with one output per "
                          "class; use label mode 'known' for this model")
    return last


def infer_label(oracle: GradientOracle, gradient: torch.Tensor, image_shape: tuple[int, int, int]) -> int:
    """iDLG: the label is the row of the last linear layer's weight gradient with the most negative sum.

    For cross-entropy, that gradient's row k is (p_k - y_k) * h with h the features entering the
    layer; when h >= 0 (after ReLU or sigmoid) only the true label's row sums below zero.
    """
    classes = oracle.num_classes(image_shape)
    name = _last_linear_name(oracle, classes) + ".weight"
    weight_grad = oracle.layout.unflatten(gradient)[name]  # (classes, features)
    return int(torch.argmin(weight_grad.sum(dim=1)).item())
