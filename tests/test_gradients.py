import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_model_unchanged, snapshot_model

from lavp_core.errors import ConfigError, ModelError
from lavp_core.gradients import GradientOracle, client_update, infer_label
from lavp_core.models import create_model


@pytest.mark.parametrize("arch", ["lenet", "resnet8"])
def test_gradient_matches_plain_autograd(arch, photos_val):
    model = create_model(arch, 10, seed=2)
    x01, y = photos_val[7]
    x = photos_val.info.normalize(x01)[None]
    reference = create_model(arch, 10, seed=2)
    loss = F.cross_entropy(reference(x), torch.tensor([y]))
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(reference.parameters()))])
    got = GradientOracle(model).gradient(x, y)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_gradient_leaves_model_untouched_even_in_train_mode(photos_val):
    model = create_model("resnet8", 10, seed=0).train()
    with torch.no_grad():
        model.bn1.running_mean.add_(0.1)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = snapshot_model(model)
    x = photos_val.info.normalize(photos_val[0][0])[None]
    client_update(model, x, photos_val.label(0))
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("arch", ["lenet", "resnet8", "vgg9"])
def test_idlg_infers_the_true_label(arch, photos_val):
    oracle = GradientOracle(create_model(arch, 10, seed=4))
    for i in range(12):
        x01, y = photos_val[i]
        update = client_update(oracle, photos_val.info.normalize(x01)[None], y)
        assert infer_label(oracle, update.gradient, update.image_shape) == y


def test_bad_label_and_shape(lenet):
    oracle = GradientOracle(lenet)
    with pytest.raises(ConfigError, match="out of range"):
        oracle.check(torch.zeros(1, 3, 32, 32), 10)
    with pytest.raises(ModelError, match=r"\(1, C, H, W\)"):
        oracle.check(torch.zeros(3, 32, 32), 0)
    with pytest.raises(ModelError, match="cannot take"):
        oracle.check(torch.zeros(1, 3, 16, 16), 0)


def test_model_without_classifier_output_is_refused():
    flat = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3))  # returns a feature map, not logits
    with pytest.raises(ModelError, match=r"\(1, classes\)"):
        GradientOracle(flat).check(torch.zeros(1, 3, 8, 8), 0)


def test_batch_norm_as_its_eval_affine_map_gives_the_same_gradient():
    from lavp_core.gradients import EvalBatchNorm

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 3)).double()
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64))
    model.eval()
    x = torch.randn(1, 3, 6, 6, generator=gen, dtype=torch.float64)
    loss = F.cross_entropy(model(x), torch.tensor([2]))
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    oracle = GradientOracle(model)
    assert sum(isinstance(m, EvalBatchNorm) for m in oracle.module.modules()) == 2
    assert not any(isinstance(m, EvalBatchNorm) for m in model.modules())  # the caller's model is untouched
    assert list(oracle.params) == [n for n, _ in model.named_parameters()]
    got = oracle.gradient(x, 2)
    assert float((got - expected).norm()) <= 1e-12 * float(expected.norm())
