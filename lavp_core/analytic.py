"""R-CONV: analytical reconstruction of one training image from its weight gradient.

The attack reads the client's image straight out of the gradient of a network made of
convolutional layers with element-wise activations followed by linear layers (batch size 1,
cross-entropy). No optimisation is involved; everything runs in float64:

1. The first linear layer's input is the ratio of a weight-gradient row and the matching bias
   gradient, ``h = dL/dW[k, :] / dL/db[k]``; the gradient reaching that input is ``W^T dL/db``.
   For a fully connected network this input *is* the image and the attack stops here.
2. Going down the convolutional layers, the gradient is carried back through each activation
   using the recovered outputs (ReLU' = 1[y > 0] with rounding noise counted as 0, LeakyReLU' = 1
   or a, sigmoid' = y(1 - y), tanh' = 1 - y^2), giving ``delta = dL/dO`` of the pre-activation output.
3. A layer's *gradient constraints* ``dL/dW[f, c, k, l] = sum_pq delta[f, p, q] x_pad[c, s p + k, s q + l]``
   are linear in input channel c's pixels; each channel is a system with F k^2 equations over
   H W unknowns (padding is known zeros), the same matrix for every channel. Rows are added in
   order while the rank grows until it reaches the unknowns (reported as ``constraints_needed``,
   usually a fraction of the rows); the least-squares solve then uses those rows only
   (``RConvConfig(solve_rows="selected")``, the paper's procedure) or, by default, all rows, which
   damps rounding errors amplified by saturated sigmoid/tanh units. Every available row is checked
   against the solution.
4. Where a layer has too few gradient constraints (typically the first one), its *forward
   constraints* ``O - b = W * x`` are solved instead (all channels jointly, sparse normal
   equations with iterative refinement). They need the pre-activation ``O``, so the layer's
   activation must be invertible (LeakyReLU, sigmoid, tanh); ReLU is refused there.
5. The gradient is propagated to the layer's input with the known weights (a transposed
   convolution) and the recursion continues.

Only the single-sample algorithm of R-CONV is implemented; the extended paper's high-dimensional
and mini-batch algorithms are described only in its abstract.

Nothing here returns a silent wrong image: a model outside the supported family, a system whose
rank falls short of its unknowns, or an inconsistent gradient raises
:class:`~lavp_core.errors.UnsupportedModelError` naming the layer and the reason, and the final
reconstruction is checked by recomputing the client's gradient from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import AttackSnapshot
from .data import DatasetInfo
from .errors import ConfigError, ModelError, UnsupportedModelError
from .gradients import ClientUpdate, GradientOracle, client_update
from .presets import AttackKind, AttackOutcome, AttackPreset, AttackRequest, register_kind, register_preset

_POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d)
_NORMALISATION = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_PASS_THROUGH = (nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout)
_INVERTIBLE = ("identity", "leaky_relu", "sigmoid", "tanh")


# --------------------------------------------------------------------------------------------
# Results


SOLVE_ROWS = ("all", "selected")


@dataclass(frozen=True)
class RConvConfig:
    """Settings of the R-CONV attack.

    Args:
        solve_rows: which gradient-constraint rows the least-squares solve uses. ``"selected"``:
            only the rows added (in order) until the rank reached the unknowns, as in the paper;
            ``"all"`` (default): every available row, which damps rounding errors amplified by
            saturated sigmoid/tanh units (the selection is still computed and reported).
        rank_rtol: a gradient-constraint row raises the rank when its distance to the span of the
            rows before it exceeds ``rank_rtol`` times the largest row norm.
        max_forward_condition: the forward system is refused as numerically rank deficient when the
            1-norm condition number of its normal equations exceeds this.
        tolerance: largest relative residual accepted for any system and for the recomputed
            gradient; ``None``: 100 sqrt(eps) of the gradient's dtype (1.5e-6 for float64).
    """

    solve_rows: str = "all"
    rank_rtol: float = 1e-9
    max_forward_condition: float = 1e14
    tolerance: float | None = None

    def validated(self) -> RConvConfig:
        """Return ``self`` after checking every field; raise :class:`ConfigError` otherwise."""
        if self.solve_rows not in SOLVE_ROWS:
            raise ConfigError(f"unknown solve_rows {self.solve_rows!r}: choose one of "
                              f"{', '.join(SOLVE_ROWS)}")
        if not 0 < self.rank_rtol < 1:
            raise ConfigError(f"rank_rtol must lie in (0, 1), got {self.rank_rtol!r}")
        if not self.max_forward_condition > 1:
            raise ConfigError(f"max_forward_condition must exceed 1, got {self.max_forward_condition!r}")
        if self.tolerance is not None and not (0 < self.tolerance < 1):
            raise ConfigError(f"tolerance must lie in (0, 1) or be None, got {self.tolerance!r}")
        return self


@dataclass(frozen=True)
class LayerReport:
    """How one layer was inverted.

    Args:
        name: the layer's module name in the model.
        kind: ``"linear"`` or ``"conv"``.
        method: ``"linear"`` (ratio of weight and bias gradients), ``"gradient"`` (the layer's
            gradient constraints) or ``"forward"`` (its forward constraints O - b = W * x).
        constraints_available: equations the method offers (``gradient``: F k^2 per input channel,
            summed over the C channels; ``forward``: F H' W'; ``linear``: the weight-gradient entries).
        constraints_needed: equations added in order until the rank stopped growing at the
            unknowns (summed over channels): these alone determine the input.
        constraints_used: equations the solve used (``needed`` or ``available``, see
            :attr:`RConvConfig.solve_rows`).
        unknowns: unknown values of the layer's input (C H W, or the input width).
        rank: rank reached (summed over channels).
        residual: relative residual of *all* available equations at the solution.
        note: extra detail, e.g. why the gradient constraints were not enough.
    """

    name: str
    kind: str
    method: str
    constraints_available: int
    constraints_needed: int
    constraints_used: int
    unknowns: int
    rank: int
    residual: float
    note: str = ""


@dataclass(frozen=True)
class AnalyticResult:
    """Outcome of an R-CONV reconstruction.

    Args:
        reconstruction: the recovered image (1, C, H, W), float64, in the model's normalised input space.
        layers: one :class:`LayerReport` per inverted layer, in the model's order (first layer first).
        label: the label used to verify the reconstruction (read from the output bias gradient).
        gradient_residual: ||g(reconstruction) - g*|| / ||g*|| for the recomputed client gradient.
        seconds: wall-clock time of the whole attack.
    """

    reconstruction: torch.Tensor  # (1, C, H, W) float64, normalised
    layers: tuple[LayerReport, ...]
    label: int
    gradient_residual: float
    seconds: float


def format_layer_table(result: AnalyticResult) -> str:
    """A plain-text table of ``result.layers`` (one row per layer) for the CLI or a log."""
    header = ("layer", "kind", "method", "available", "needed", "used", "unknowns", "rank", "residual")
    rows = [header] + [(r.name, r.kind, r.method, str(r.constraints_available), str(r.constraints_needed),
                        str(r.constraints_used), str(r.unknowns), str(r.rank), f"{r.residual:.1e}")
                       for r in result.layers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The model as a chain of stages


@dataclass(frozen=True)
class _Stage:
    """One Conv2d or Linear layer and the element-wise activation applied to its output."""

    name: str
    module: nn.Module  # nn.Conv2d or nn.Linear of the private float64 copy
    activation: str  # "identity", "relu", "leaky_relu", "sigmoid", "tanh"
    slope: float  # LeakyReLU's negative slope (0 otherwise)
    in_shape: tuple[int, ...]  # (C, H, W) or (n,), without the batch dimension
    out_shape: tuple[int, ...]  # (F, H', W') or (m,)
    padding: tuple[int, int] = (0, 0)  # numeric padding of a convolution

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's forward: (1, ...) -> (1, ...)."""
        if self.is_conv:
            m = self.module
            z = F.conv2d(x, m.weight, m.bias, m.stride, self.padding, m.dilation)
        else:
            z = F.linear(x.flatten(1), self.module.weight, self.module.bias)
        return _activate(z, self.activation, self.slope)


def _activate(z: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    if kind == "relu":
        return torch.relu(z)
    if kind == "leaky_relu":
        return F.leaky_relu(z, slope)
    if kind == "sigmoid":
        return torch.sigmoid(z)
    if kind == "tanh":
        return torch.tanh(z)
    return z


# A recovered ReLU output counts as inactive below this fraction of the layer's largest output:
# exact zeros come back from a least-squares solve as rounding noise of about 1e-15.
RELU_ZERO_RTOL = 1e-9


def _activation_derivative(y: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    """d activation / d pre-activation, evaluated from the activation's *output* y (as autograd does)."""
    if kind == "relu":
        return (y > RELU_ZERO_RTOL * float(y.abs().max())).to(y.dtype)
    if kind == "leaky_relu":
        return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, slope))
    if kind == "sigmoid":
        return y * (1 - y)
    if kind == "tanh":
        return 1 - y * y
    return torch.ones_like(y)


def _activation_inverse(y: torch.Tensor, stage: _Stage) -> torch.Tensor:
    """The pre-activation O from the output y of an invertible activation."""
    kind = stage.activation
    if kind == "leaky_relu":
        return torch.where(y > 0, y, y / stage.slope)
    if kind in ("sigmoid", "tanh"):
        low, high = (0.0, 1.0) if kind == "sigmoid" else (-1.0, 1.0)
        saturated = int(((y <= low) | (y >= high)).sum())
        if saturated:
            raise UnsupportedModelError(
                f"layer {stage.name!r}: {saturated} outputs of its {kind} saturate to {low:g} or "
                f"{high:g} in float64, so its pre-activations (needed by its forward constraints) are "
                f"lost; use a LeakyReLU on this layer or smaller weights")
        return torch.logit(y) if kind == "sigmoid" else torch.atanh(y)
    return y


def _activation_name(module: nn.Module) -> tuple[str, float] | None:
    if isinstance(module, nn.ReLU):
        return "relu", 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.Sigmoid):
        return "sigmoid", 0.0
    if isinstance(module, nn.Tanh):
        return "tanh", 0.0
    return None


def _numeric_padding(name: str, conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            raise UnsupportedModelError(
                f"layer {name!r}: padding='same' with an even kernel pads asymmetrically, which "
                f"R-CONV does not model; use an odd kernel or numeric padding")
        return (totals[0] // 2, totals[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def _trace_leaf_calls(module: nn.Module, probe: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Run ``probe`` through ``module``, recording (name, leaf module, input, output) in call order."""
    calls: list[tuple[str, nn.Module, torch.Tensor | None, torch.Tensor]] = []
    handles = []

    def recorder(name):
        def hook(mod, inputs, output):
            first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            out = output.detach().clone() if isinstance(output, torch.Tensor) else output
            calls.append((name, mod, None if first is None else first.detach().clone(), out))
        return hook

    for name, mod in module.named_modules():
        if name and next(iter(mod.children()), None) is None:
            handles.append(mod.register_forward_hook(recorder(name)))
    try:
        with torch.no_grad():
            try:
                output = module(probe)
            except RuntimeError as exc:
                raise ModelError(f"the model cannot take an input of shape {tuple(probe.shape)} "
                                 f"({str(exc).splitlines()[0][:120]})") from exc
    finally:
        for handle in handles:
            handle.remove()
    return calls, output


def _plan(module: nn.Module, image_shape: tuple[int, int, int]) -> list[_Stage]:
    """Read the (float64, eval) module as a chain of stages, or raise UnsupportedModelError."""
    for name, mod in module.named_modules():
        if next(iter(mod.children()), None) is not None and any(True for _ in mod.parameters(recurse=False)):
            raise UnsupportedModelError(
                f"layer {name or type(mod).__name__!r} ({type(mod).__name__}) holds its own parameters "
                f"next to sub-layers; R-CONV only inverts nn.Conv2d and nn.Linear layers")
    probe_dtype = next(module.parameters()).dtype
    probe_device = next(module.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn((1, *image_shape), generator=generator, dtype=probe_dtype).to(probe_device)
    calls, output = _trace_leaf_calls(module, probe)

    stages: list[dict] = []
    seen: set[int] = set()
    for name, mod, inp, out in calls:
        if id(mod) in seen:
            raise UnsupportedModelError(
                f"layer {name!r} is applied more than once in the forward pass (shared weights); "
                f"R-CONV needs each layer to be used once")
        seen.add(id(mod))
        kind = type(mod).__name__
        if isinstance(mod, _PASS_THROUGH):
            continue
        if isinstance(mod, _POOLING):
            raise UnsupportedModelError(
                f"layer {name!r} ({kind}) is a pooling layer: it merges several values into one, so "
                f"its input cannot be recovered from the gradient; R-CONV supports no pooling "
                f"(use strided convolutions instead)")
        if isinstance(mod, _NORMALISATION):
            raise UnsupportedModelError(
                f"layer {name!r} ({kind}) is a normalisation layer: it couples each value to "
                f"statistics of the whole input, which R-CONV's linear systems cannot express; "
                f"remove it (R-CONV supports convolution / activation / linear chains only)")
        act = _activation_name(mod)
        if act is not None:
            if not stages or stages[-1]["activation"] != "identity":
                raise UnsupportedModelError(
                    f"layer {name!r} ({kind}) does not directly follow a Conv2d or Linear layer; "
                    f"R-CONV needs exactly one element-wise activation after a layer")
            if act[0] == "leaky_relu" and act[1] < 0:
                raise UnsupportedModelError(
                    f"layer {name!r}: a LeakyReLU with negative slope {act[1]} is not monotone, so "
                    f"its derivative cannot be read from its output; use a positive slope")
            stages[-1]["activation"], stages[-1]["slope"] = act
            if act == ("leaky_relu", 0.0):
                stages[-1]["activation"] = "relu"
            continue
        if isinstance(mod, nn.Conv2d):
            if any(s["kind"] == "linear" for s in stages):
                raise UnsupportedModelError(
                    f"layer {name!r} (Conv2d) comes after a linear layer; R-CONV needs all "
                    f"convolutions before the linear layers")
            if mod.groups != 1:
                raise UnsupportedModelError(
                    f"layer {name!r} is a grouped convolution (groups={mod.groups}); R-CONV supports "
                    f"groups=1 only")
            if mod.padding_mode != "zeros":
                raise UnsupportedModelError(
                    f"layer {name!r} pads with {mod.padding_mode!r}; R-CONV treats padding as known "
                    f"zeros, so use padding_mode='zeros'")
            stages.append(dict(name=name, module=mod, kind="conv", activation="identity", slope=0.0,
                               in_shape=tuple(inp.shape[1:]), out_shape=tuple(out.shape[1:]),
                               padding=_numeric_padding(name, mod), input=inp))
            continue
        if isinstance(mod, nn.Linear):
            if inp.dim() != 2:
                raise UnsupportedModelError(
                    f"layer {name!r} (Linear) is applied to a tensor of shape {tuple(inp.shape)}; R-CONV "
                    f"needs linear layers on flattened (1, n) inputs")
            first_linear = not any(s["kind"] == "linear" for s in stages)
            if mod.bias is None and first_linear:
                raise UnsupportedModelError(
                    f"layer {name!r} is a linear layer without bias: R-CONV reads its input as the "
                    f"ratio of weight and bias gradients, so it needs nn.Linear(..., bias=True)")
            stages.append(dict(name=name, module=mod, kind="linear", activation="identity", slope=0.0,
                               in_shape=(int(inp[0].numel()),), out_shape=tuple(out.shape[1:]),
                               padding=(0, 0), input=inp))
            continue
        raise UnsupportedModelError(
            f"layer {name!r} ({kind}) is not supported by R-CONV, which inverts chains of Conv2d and "
            f"Linear layers with ReLU, LeakyReLU, Sigmoid or Tanh activations (no pooling, no "
            f"normalisation)")

    if not stages or stages[-1]["kind"] != "linear":
        raise UnsupportedModelError(
            "the model does not end with a linear layer; R-CONV needs the logits to come from a "
            "biased nn.Linear layer")
    if stages[-1]["activation"] != "identity":
        raise UnsupportedModelError(
            f"output layer {stages[-1]['name']!r} is followed by an activation; R-CONV needs the "
            f"logits straight from the last linear layer (the loss applies the softmax)")

    owned = set()
    for s in stages:
        owned.update(f"{s['name']}.{p}" for p, _ in s["module"].named_parameters())
    for pname, _ in module.named_parameters():
        if pname not in owned:
            raise UnsupportedModelError(
                f"parameter {pname!r} belongs to no Conv2d or Linear layer of the forward chain; "
                f"R-CONV cannot account for its gradient")

    plan = [_Stage(s["name"], s["module"], s["activation"], s["slope"], s["in_shape"], s["out_shape"],
                   s["padding"]) for s in stages]
    # The hooks saw the layers; check that the forward really is the chain stage after stage.
    x = probe
    for stage, info in zip(plan, stages, strict=True):
        seen_input = info["input"]
        if x.numel() != seen_input.numel() or not torch.allclose(
                x.reshape(seen_input.shape), seen_input, rtol=1e-9, atol=1e-12):
            raise UnsupportedModelError(
                f"the input of layer {stage.name!r} is not the output of the layer before it: the "
                f"model's forward applies something that is not an nn.Module layer (a residual "
                f"connection, a functional pooling or activation such as torch.relu); R-CONV needs "
                f"a plain chain of layer modules")
        x = stage.apply(x.reshape(seen_input.shape))
    if x.shape != output.shape or not torch.allclose(x, output, rtol=1e-9, atol=1e-12):
        raise UnsupportedModelError(
            f"the model's output is not the output of its last layer {plan[-1].name!r}: the forward "
            f"transforms the logits further; R-CONV needs the logits straight from a linear layer")
    for stage in plan:
        if stage.is_conv:
            _check_conv_structure(stage)
    return plan


def _input_coverage(stage: _Stage) -> torch.Tensor:
    """Boolean (H, W): which input pixels at least one kernel tap of some output position reads."""
    _, h, w = stage.in_shape
    rows, cols, valid = _tap_indices(stage)
    covered = torch.zeros(h * w, dtype=torch.bool)
    covered[(rows * w + cols)[valid]] = True
    return covered.view(h, w)


def _check_conv_structure(stage: _Stage) -> None:
    """Refuse a convolution whose systems are short of unknowns whatever the data."""
    c, h, w = stage.in_shape
    f, ho, wo = stage.out_shape
    kh, kw = stage.module.kernel_size
    missing = int((~_input_coverage(stage)).sum())
    if missing:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: {missing} of the {h * w} pixels of each input channel are read by "
            f"no kernel tap (stride {tuple(stage.module.stride)} skips them or the windows stop short of "
            f"the border), so "
            f"neither the gradient nor the output depends on them; the system is rank deficient")
    if f * kh * kw >= h * w:
        return
    reason = (f"its gradient constraints give {f * kh * kw} equations per input channel for {h * w} "
              f"unknowns")
    if stage.activation not in _INVERTIBLE:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: {reason}, and its {stage.activation} activation is not invertible, "
            f"so its forward constraints cannot be used; give it at least {math.ceil(h * w / (kh * kw))} "
            f"filters or a LeakyReLU activation")
    if f * ho * wo < c * h * w:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: {reason}, and its forward constraints give {f * ho * wo} equations "
            f"for {c * h * w} unknowns; the system is rank deficient (use more filters or a smaller "
            f"stride)")


# --------------------------------------------------------------------------------------------
# Linear systems


def _tap_indices(stage: _Stage) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input row/column read by tap (k, l) at output position (p, q), and whether it lies inside.

    Returns three (kh, kw, H', W') tensors: row index i, column index j, and validity.
    """
    _, h, w = stage.in_shape
    _, ho, wo = stage.out_shape
    conv = stage.module
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw), (ph, pw) = conv.stride, conv.dilation, stage.padding
    k = torch.arange(kh).view(kh, 1, 1, 1)
    l_ = torch.arange(kw).view(1, kw, 1, 1)
    p = torch.arange(ho).view(1, 1, ho, 1)
    q = torch.arange(wo).view(1, 1, 1, wo)
    rows = (sh * p + dh * k - ph).expand(kh, kw, ho, wo)
    cols = (sw * q + dw * l_ - pw).expand(kh, kw, ho, wo)
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return rows, cols, valid


def _gradient_matrix(stage: _Stage, delta: torch.Tensor) -> torch.Tensor:
    """A (F kh kw, H W) with dL/dW[f, c, k, l] = A[(f, k, l), :] @ x[c].flatten() for every channel c.

    ``delta`` is dL/dO (F, H', W') of the layer's pre-activation output.
    """
    _, h, w = stage.in_shape
    f = delta.shape[0]
    kh, kw = stage.module.kernel_size
    rows, cols, valid = _tap_indices(stage)  # (kh, kw, H', W')
    eq = (torch.arange(f).view(f, 1, 1, 1, 1) * (kh * kw)
          + torch.arange(kh * kw).view(1, kh, kw, 1, 1))  # (F, kh, kw, 1, 1)
    eq = eq.expand(f, kh, kw, *rows.shape[2:])
    pixel = (rows * w + cols).unsqueeze(0).expand_as(eq)
    mask = valid.unsqueeze(0).expand_as(eq)  # (F, kh, kw, H', W') on the CPU
    values = delta.view(f, 1, 1, *delta.shape[1:]).expand(eq.shape)[mask.to(delta.device)]
    matrix = torch.zeros(f * kh * kw, h * w, dtype=delta.dtype, device=delta.device)
    matrix.index_put_((eq[mask].to(delta.device), pixel[mask].to(delta.device)), values, accumulate=True)
    return matrix


def _forward_matrix(stage: _Stage) -> sp.csr_matrix:
    """J (F H' W', C H W), sparse: the convolution without bias as a matrix, O - b = J @ x.flatten()."""
    c, h, w = stage.in_shape
    f, ho, wo = stage.out_shape
    weight = stage.module.weight.detach().to("cpu", torch.float64)  # (F, C, kh, kw)
    kh, kw = weight.shape[2:]
    rows, cols, valid = _tap_indices(stage)  # (kh, kw, H', W')
    out_index = (torch.arange(f).view(f, 1, 1, 1, 1, 1) * (ho * wo)
                 + torch.arange(ho).view(1, 1, 1, 1, ho, 1) * wo
                 + torch.arange(wo).view(1, 1, 1, 1, 1, wo))  # (F, 1, 1, 1, H', W')
    in_index = (torch.arange(c).view(1, c, 1, 1, 1, 1) * (h * w)
                + (rows * w + cols).view(1, 1, kh, kw, ho, wo))  # (1, C, kh, kw, H', W')
    shape = (f, c, kh, kw, ho, wo)
    mask = valid.view(1, 1, kh, kw, ho, wo).expand(shape)
    data = weight.view(f, c, kh, kw, 1, 1).expand(shape)[mask].numpy()
    r = out_index.expand(shape)[mask].numpy()
    q = in_index.expand(shape)[mask].numpy()
    return sp.csr_matrix((data, (r, q)), shape=(f * ho * wo, c * h * w))


def _rank_growth(matrix: torch.Tensor, target: int, rtol: float, block: int = 64) -> tuple[int, int]:
    """Add the rows of ``matrix`` (R, N) in order while the rank grows; stop at rank ``target``.

    A row raises the rank when its distance to the span of the rows kept so far exceeds ``rtol``
    times the largest row norm (block classical Gram-Schmidt with re-orthogonalisation).

    Returns:
        (rank reached, number of rows added to reach it): (target, m) when the first m rows reach
        ``target``, else (rank of all rows, R).
    """
    rows, width = matrix.shape
    norms = torch.linalg.vector_norm(matrix, dim=1)  # (R,)
    scale = float(norms.max()) if rows else 0.0
    if scale == 0.0 or target == 0:
        return 0, rows
    tol = rtol * scale
    basis = torch.empty((min(target, width), width), dtype=matrix.dtype, device=matrix.device)  # (r, N)
    rank = 0
    for start in range(0, rows, block):
        candidates = matrix[start:start + block].clone()  # (b, N)
        for _ in range(2):  # project out the span kept so far, twice for stability
            if rank:
                candidates -= (candidates @ basis[:rank].T) @ basis[:rank]
        first_new = rank
        for offset in range(candidates.shape[0]):
            v = candidates[offset]
            for _ in range(2):
                if rank > first_new:
                    v = v - basis[first_new:rank].T @ (basis[first_new:rank] @ v)
            distance = float(torch.linalg.vector_norm(v))
            if distance > tol:
                basis[rank] = v / distance
                rank += 1
                if rank == target:
                    return rank, start + offset + 1
    return rank, rows


def _relative(residual: float, reference: float) -> float:
    return residual / reference if reference > 0 else (0.0 if residual == 0 else math.inf)


_AMPLIFIED = ("or rounding errors were amplified beyond the tolerance (e.g. by saturated sigmoid/tanh units "
              "in the layers above; LeakyReLU layers avoid this)")


def _solve_gradient_constraints(stage: _Stage, delta: torch.Tensor, weight_grad: torch.Tensor,
                                config: RConvConfig, tol: float) -> tuple[torch.Tensor | None, LayerReport]:
    """Solve the per-channel gradient constraints for the layer's input (C, H, W).

    Returns (None, report) when their rank falls short of the H W unknowns per channel.
    """
    c, h, w = stage.in_shape
    f = weight_grad.shape[0]
    kh, kw = stage.module.kernel_size
    available = f * kh * kw  # equations per input channel
    if available < h * w:  # the rank cannot reach the unknowns whatever the data
        note = (f"its gradient constraints give only {available} equations per input channel for "
                f"{h * w} unknowns")
        return None, LayerReport(stage.name, "conv", "gradient", available * c, 0, 0, c * h * w,
                                 available * c, math.nan, note)
    matrix = _gradient_matrix(stage, delta)  # (F kh kw, H W), shared by every input channel
    rhs = weight_grad.permute(0, 2, 3, 1).reshape(available, c)  # (F kh kw, C)
    rank, needed = _rank_growth(matrix, h * w, config.rank_rtol)
    if rank < h * w:
        note = f"its gradient constraints reach rank {rank} of {h * w} unknowns per input channel"
        return None, LayerReport(stage.name, "conv", "gradient", available * c, 0, 0, c * h * w,
                                 rank * c, math.nan, note)
    used = needed if config.solve_rows == "selected" else available
    solution = torch.linalg.lstsq(matrix[:used], rhs[:used]).solution  # (H W, C)
    residual = _relative(float(torch.linalg.norm(matrix @ solution - rhs)), float(torch.linalg.norm(rhs)))
    report = LayerReport(stage.name, "conv", "gradient", available * c, needed * c, used * c, c * h * w,
                         rank * c, residual,
                         f"rank reached after {needed} of {available} equations per input channel")
    if not residual <= tol:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: its gradient constraints are inconsistent (relative residual "
            f"{residual:.1e}): the gradient does not come from one image through this model (a batch "
            f"of several images, another model, a noisy or compressed gradient), {_AMPLIFIED}")
    return solution.T.reshape(c, h, w), report


def _solve_forward_constraints(stage: _Stage, output: torch.Tensor, config: RConvConfig, tol: float,
                               gradient_note: str) -> tuple[torch.Tensor, LayerReport]:
    """Solve O - b = W * x for the layer's input x (C, H, W) from its activated output (F, H', W')."""
    c, h, w = stage.in_shape
    pre = _activation_inverse(output, stage)  # (F, H', W')
    bias = stage.module.bias
    if bias is not None:
        pre = pre - bias.view(-1, 1, 1)
    rhs = pre.detach().to("cpu", torch.float64).reshape(-1).numpy()  # (F H' W',)
    jac = _forward_matrix(stage)  # (F H' W', C H W)
    rows, unknowns = jac.shape
    if rows < unknowns:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: {gradient_note}, and its forward constraints give {rows} equations "
            f"for {unknowns} unknowns; the system is rank deficient (use more filters or a smaller stride)")
    gram = (jac.T @ jac).tocsc()  # (C H W, C H W) normal equations
    try:
        lu = spla.splu(gram)
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: {gradient_note}, and its forward constraints ({rows} equations "
            f"for {unknowns} unknowns) are rank deficient ({exc}); use more filters or a smaller "
            f"stride on this layer") from exc
    inverse = spla.LinearOperator(gram.shape, matvec=lu.solve, rmatvec=lambda v: lu.solve(v, trans="T"),
                                  dtype=np.float64)
    condition = float(spla.onenormest(inverse)) * float(abs(gram).sum(axis=0).max())
    if not condition <= config.max_forward_condition:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: {gradient_note}, and its forward constraints ({rows} equations for "
            f"{unknowns} unknowns) are numerically rank deficient (condition number of the normal "
            f"equations ~{condition:.1e}); use more filters or a smaller stride on this layer")
    x = lu.solve(jac.T @ rhs)
    for _ in range(2):  # iterative refinement against the original (not squared) system
        x = x + lu.solve(jac.T @ (rhs - jac @ x))
    residual = _relative(float(np.linalg.norm(jac @ x - rhs)), float(np.linalg.norm(rhs)))
    report = LayerReport(stage.name, "conv", "forward", rows, rows, rows, unknowns, unknowns, residual,
                         f"{gradient_note}; forward constraints used (condition number of the normal "
                         f"equations ~{condition:.1e})")
    if not residual <= tol:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: its forward constraints are inconsistent (relative residual "
            f"{residual:.1e}): either the recovered outputs are not this layer's outputs for any input "
            f"(the gradient does not come from one image through this model), {_AMPLIFIED}")
    return torch.from_numpy(x).to(output.device, torch.float64).view(c, h, w), report


def _invert_first_linear(stage: _Stage, grads: dict[str, torch.Tensor],
                         tol: float) -> tuple[torch.Tensor, torch.Tensor, LayerReport]:
    """(input h (n,), dL/dh (n,), report) of a biased linear layer from its weight and bias gradients."""
    weight_grad = grads[f"{stage.name}.weight"]  # (m, n)
    bias_grad = grads[f"{stage.name}.bias"]  # (m,)
    row = int(torch.argmax(bias_grad.abs()))  # the numerically best row
    if float(bias_grad[row]) == 0.0:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: its bias gradient is zero, so its input cannot be read from the "
            f"gradient: no signal reaches this layer (every ReLU after it is inactive, or the softmax "
            f"saturates so the client's loss is zero in float64)")
    h = weight_grad[row] / bias_grad[row]  # (n,)
    residual = _relative(float(torch.linalg.norm(weight_grad - torch.outer(bias_grad, h))),
                         float(torch.linalg.norm(weight_grad)))
    m, n = weight_grad.shape
    report = LayerReport(stage.name, "linear", "linear", m * n, n, n, n, n, residual,
                         f"row {row} of the weight gradient divided by the bias gradient")
    if not residual <= tol:
        raise UnsupportedModelError(
            f"layer {stage.name!r}: its weight gradient is not the outer product of its bias gradient "
            f"and one input (relative residual {residual:.1e}): the update was computed on more than "
            f"one image (R-CONV here inverts batch size 1 only) or is not this model's gradient")
    return h, stage.module.weight.T @ bias_grad, report


def _verification_label(oracle: GradientOracle, last: _Stage, grads: dict[str, torch.Tensor],
                        reconstruction: torch.Tensor, label: int | None) -> int:
    """The label the gradient was computed with, to recompute it from the reconstruction.

    Cross-entropy makes the output bias gradient p - onehot(label): its only negative entry is the
    label. When the softmax saturates (p_label rounds to 1) no entry is negative; then the given
    label is used, or else the class the reconstruction is predicted as.
    """
    if last.module.bias is not None:
        bias_grad = grads[f"{last.name}.bias"]  # (classes,)
        if float(bias_grad.min()) < 0:
            return int(torch.argmin(bias_grad))
    if label is not None:
        return int(label)
    with torch.no_grad():
        return int(torch.argmax(oracle.logits(reconstruction)[0]))


# --------------------------------------------------------------------------------------------
# Public API


def check_rconv_supported(model: nn.Module, image_shape: tuple[int, int, int]) -> None:
    """Raise :class:`UnsupportedModelError` unless R-CONV can handle ``model`` on (C, H, W) inputs.

    The check is structural (layer types and order, biases, equation counts, pixel coverage); a
    system whose rank falls short only for the data at hand is refused by :func:`reconstruct_rconv`.
    The model is not modified.
    """
    oracle = GradientOracle(model, dtype=torch.float64)
    _plan(oracle.module, tuple(int(s) for s in image_shape))


def reconstruct_rconv_from_gradient(model: nn.Module, gradient: torch.Tensor,
                                    image_shape: tuple[int, int, int], *, label: int | None = None,
                                    config: RConvConfig = RConvConfig(),
                                    device: torch.device | str | None = None) -> AnalyticResult:
    """R-CONV on a flat client gradient.

    Args:
        model: the shared classifier (any dtype; a private float64 eval copy is used, the model
            itself is not modified).
        gradient: the client's flattened weight gradient (n,), in ``named_parameters()`` order, of
            the cross-entropy loss on one image. It must be float64-exact for a near-exact
            reconstruction (compute it with ``GradientOracle(model, dtype=torch.float64)``).
        image_shape: (C, H, W) of the client's image.
        label: the client's label; only used to verify the result when the output bias gradient
            does not reveal it (no bias, or a saturated softmax).
        config: solver settings (:class:`RConvConfig`).
        device: where to compute (default: the model's device); the sparse forward solve runs on the CPU.

    Returns:
        :class:`AnalyticResult` with the reconstruction (1, C, H, W) float64 in normalised space.

    Raises:
        UnsupportedModelError: the model is outside R-CONV's family, a layer's system is rank
            deficient, or the gradient is inconsistent with one image through this model.
    """
    start = time.perf_counter()
    config = config.validated()
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3:
        raise ModelError(f"image_shape must be (C, H, W), got {image_shape}")
    oracle = GradientOracle(model, device=device, dtype=torch.float64)
    plan = _plan(oracle.module, image_shape)
    if (not isinstance(gradient, torch.Tensor) or gradient.dim() != 1
            or gradient.numel() != oracle.layout.size):
        got = tuple(gradient.shape) if isinstance(gradient, torch.Tensor) else type(gradient).__name__
        raise ModelError(f"the gradient has shape {got} but the model has {oracle.layout.size} "
                         f"parameters; pass the flat gradient of this model")
    if config.tolerance is not None:
        tol = config.tolerance
    else:
        dtype = gradient.dtype if gradient.is_floating_point() else torch.float64
        tol = 100.0 * math.sqrt(torch.finfo(dtype).eps)
    flat = gradient.detach().to(oracle.device, torch.float64)  # (n,)
    if not bool(torch.isfinite(flat).all()):
        raise ModelError("the gradient contains NaN or infinite values")
    grads = oracle.layout.unflatten(flat)

    first_linear = next(i for i, s in enumerate(plan) if not s.is_conv)
    h, h_grad, report = _invert_first_linear(plan[first_linear], grads, tol)
    reports = [report]
    if first_linear == 0:
        x = h.view(image_shape)
    else:
        out = h.view(plan[first_linear - 1].out_shape)  # (F, H', W') activated output of the last conv
        out_grad = h_grad.view(out.shape)  # dL/d out
        for index in range(first_linear - 1, -1, -1):
            stage = plan[index]
            delta = out_grad * _activation_derivative(out, stage.activation, stage.slope)  # dL/dO (F, H', W')
            x, report = _solve_gradient_constraints(stage, delta, grads[f"{stage.name}.weight"], config, tol)
            if x is None:
                if stage.activation not in _INVERTIBLE:
                    raise UnsupportedModelError(
                        f"layer {stage.name!r}: {report.note}, and its {stage.activation} activation is "
                        f"not invertible, so its forward constraints cannot be used; give it more "
                        f"filters or a LeakyReLU activation")
                x, report = _solve_forward_constraints(stage, out, config, tol, report.note)
            reports.append(report)
            if index > 0:
                conv = stage.module
                out_grad = torch.nn.grad.conv2d_input(
                    (1, *stage.in_shape), conv.weight, delta.unsqueeze(0), conv.stride, stage.padding,
                    conv.dilation)[0]  # dL/dx (C, H, W): the previous layer's output gradient
                out = x
        x = x.reshape(image_shape)

    reconstruction = x.unsqueeze(0).detach()  # (1, C, H, W)
    check_label = _verification_label(oracle, plan[-1], grads, reconstruction, label)
    recomputed = oracle.gradient(reconstruction, check_label)  # (n,)
    gradient_residual = _relative(float(torch.linalg.norm(recomputed - flat)), float(torch.linalg.norm(flat)))
    if not gradient_residual <= tol:
        errors = {name: _relative(float(torch.linalg.norm(got - grads[name])),
                                  float(torch.linalg.norm(grads[name])))
                  for name, got in oracle.layout.unflatten(recomputed).items()}
        worst = max(errors, key=errors.get)
        raise UnsupportedModelError(
            f"layer {worst.rsplit('.', 1)[0]!r}: the reconstruction does not reproduce its gradient "
            f"(relative error {errors[worst]:.1e}; {gradient_residual:.1e} overall): either the update "
            f"does not come from one image through this model in eval mode, {_AMPLIFIED}")
    return AnalyticResult(reconstruction, tuple(reversed(reports)), check_label, gradient_residual,
                          time.perf_counter() - start)


def reconstruct_rconv(model: nn.Module, update: ClientUpdate, *, config: RConvConfig = RConvConfig(),
                      device: torch.device | str | None = None) -> AnalyticResult:
    """R-CONV on a client update (see :func:`reconstruct_rconv_from_gradient`).

    Args:
        model: the shared classifier; it is not modified.
        update: the client's update for one image; its gradient should be float64
            (``client_update(GradientOracle(model, dtype=torch.float64), image.double(), label)``).
        config: solver settings (:class:`RConvConfig`).
        device: where to compute (default: the model's device).

    Returns:
        :class:`AnalyticResult`: reconstruction (1, C, H, W) float64 in normalised space, per-layer reports.
    """
    return reconstruct_rconv_from_gradient(model, update.gradient, update.image_shape, label=update.label,
                                           config=config, device=device)


class AnalyticAttack(AttackKind):
    """R-CONV: solve the gradient's linear constraints layer by layer, in float64; no settings."""

    name = "analytic"
    summary = "closed-form reconstruction from the gradient's linear constraints (no optimisation)"
    studied = False
    settings = ()
    has_loss_curve = False
    note = ("R-CONV is analytical: it has no settings, solves linear systems layer by layer (no loss curve) "
            "and inverts only chains of biased convolutions and linear layers, such as cnn-rconv and mlp-rconv.")

    def check_model(self, model: nn.Module, image_shape: tuple[int, int, int]) -> None:
        try:
            check_rconv_supported(model, image_shape)
        except UnsupportedModelError as exc:
            raise _with_choice(exc) from exc

    def defaults(self, preset: AttackPreset) -> AttackRequest:
        return AttackRequest(preset.name)

    def start(self, preset, model, image, label, info, request, *, generator, device, snapshot_every):
        return _RConvRun(preset, model, image, label, info, device)


def _with_choice(exc: UnsupportedModelError) -> UnsupportedModelError:
    """``exc`` with what to choose instead: the registered architectures R-CONV inverts."""
    from .models import list_models

    supported = [m.name for m in list_models() if m.name.endswith("-rconv")]
    return UnsupportedModelError(f"{exc} Choose an architecture R-CONV inverts ({', '.join(supported)}) or "
                                 f"another preset.")


class _RConvRun:
    """One R-CONV solve seen through the registry's run protocol: one step, one snapshot."""

    total_steps = 1

    def __init__(self, preset: AttackPreset, model: nn.Module, image: torch.Tensor, label: int,
                 info: DatasetInfo, device: torch.device):
        self.preset, self.model, self.info, self.label, self.device = preset, model, info, int(label), device
        oracle = GradientOracle(model, device=device, dtype=torch.float64)
        self.update = client_update(oracle, image.double(), label)
        self.outcome: AttackOutcome | None = None

    def cancel(self) -> None:
        """R-CONV is one solve and cannot be cut short."""

    def __iter__(self) -> Iterator[AttackSnapshot]:
        tic = time.perf_counter()
        try:
            result = reconstruct_rconv(self.model, self.update, device=self.device)
        except UnsupportedModelError as exc:  # e.g. too few constraints for this model's layers
            raise _with_choice(exc) from exc
        seconds = time.perf_counter() - tic
        image01 = self.info.denormalize(result.reconstruction[0].float()).cpu()
        yield AttackSnapshot(1, 1, math.nan, (math.nan,), image01, None)
        details = {"layers": result.layers, "gradient_residual": result.gradient_residual}
        self.outcome = AttackOutcome(self.preset.name, self.preset.kind, result.reconstruction, math.nan,
                                     result.label, self.label, 1, seconds, False, (), details)


register_kind(AnalyticAttack())
register_preset(AttackPreset(
    "rconv", "R-CONV: analytical single-image reconstruction from conv/linear gradients (float64; "
    "architectures like cnn-rconv, mlp-rconv)", "analytic"))
