import numpy as np
import pytest
import torch

from lavp_core.errors import ConfigError
from lavp_core.gradients import ParamLayout
from lavp_core.losses import get_loss, list_losses


def _vectors():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(12, generator=gen, dtype=torch.float64)
    h = torch.randn(12, generator=gen, dtype=torch.float64)
    layout = ParamLayout.of({"a": torch.zeros(3, 2), "b": torch.zeros(4), "c": torch.zeros(2)})
    return g, h, layout


def test_losses_against_numpy_formulas():
    g, h, layout = _vectors()
    a, b = g.numpy(), h.numpy()
    assert float(get_loss("l2")(g, h, layout)) == pytest.approx(0.5 * np.sum((a - b) ** 2), rel=1e-12)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert float(get_loss("cos")(g, h, layout)) == pytest.approx(1 - cos, rel=1e-12)
    per_layer = [1 - a[s] @ b[s] / (np.linalg.norm(a[s]) * np.linalg.norm(b[s])) for s in layout.slices]
    assert float(get_loss("cos-layer")(g, h, layout)) == pytest.approx(np.mean(per_layer), rel=1e-12)


@pytest.mark.parametrize("loss", list_losses(), ids=lambda l: l.name)
def test_every_loss_is_zero_at_the_target_and_positive_elsewhere(loss):
    g, h, layout = _vectors()
    assert abs(float(loss(g, g, layout))) < 1e-12
    assert float(loss(g, h, layout)) > 0


def test_unknown_loss():
    with pytest.raises(ConfigError, match="l2"):
        get_loss("huber")
