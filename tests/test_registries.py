"""Walk every registry with a tiny run, so a new entry cannot be registered broken."""

import numpy as np
import pytest
import torch
from PIL import Image

from lavp_core.attacks import preset_config, run_attack
from lavp_core.data import list_datasets, load_dataset
from lavp_core.errors import DatasetError
from lavp_core.gradients import client_update
from lavp_core.losses import list_losses
from lavp_core.models import create_model, list_models
from lavp_core.runner import AttackRequest, load_all_presets, run_preset


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for cls in ("a", "b"):
        (root / cls).mkdir()
        Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8)).save(
            root / cls / "x.png")
    return root


@pytest.mark.parametrize("spec", list_datasets(), ids=lambda s: s.name)
def test_every_dataset(spec, image_folder, tmp_path):
    if spec.name.startswith("cifar"):
        with pytest.raises(DatasetError):  # no CIFAR on this machine: the message path is what we can check
            load_dataset(spec.name, root=tmp_path)
        return
    root = image_folder if spec.needs_root else None
    ds = load_dataset(spec.name, "val", root=root, resolution=32)
    x, y = ds[0]
    assert x.shape == ds.info.image_shape and 0 <= y < ds.info.num_classes
    assert len(ds.info.mean) == len(ds.info.std) == ds.info.image_shape[0]


@pytest.mark.parametrize("spec", list_models(), ids=lambda s: s.name)
def test_every_model_gives_a_client_gradient(spec):
    model = create_model(spec.name, 3, seed=0)
    side = spec.input_size if spec.input_size <= 32 else 64  # torchvision nets pool adaptively
    x = torch.randn((1, 3, side, side), generator=torch.Generator().manual_seed(0))
    update = client_update(model, x, 1)
    assert update.gradient.numel() == sum(p.numel() for p in model.parameters())
    assert torch.isfinite(update.gradient).all()


@pytest.mark.parametrize("loss", list_losses(), ids=lambda l: l.name)
def test_every_loss_drives_an_attack(loss, photos_val, lenet):
    x = photos_val.info.normalize(photos_val[0][0])[None]
    update = client_update(lenet, x, photos_val.label(0))
    result = run_attack(lenet, update, preset_config("ig", loss=loss.name, steps=3), photos_val.info,
                        generator=torch.Generator().manual_seed(0))
    assert np.isfinite(result.matching_loss)


@pytest.mark.parametrize("preset", load_all_presets(), ids=lambda p: p.name)
def test_every_preset_runs_through_the_front_door(preset, photos_val):
    arch = "cnn-rconv" if preset.kind == "analytic" else "lenet"
    model = create_model(arch, 10, seed=0)
    x = photos_val.info.normalize(photos_val[1][0])[None]
    request = AttackRequest(preset=preset.name, steps=None if preset.kind == "analytic" else 4, restarts=2)
    outcome = run_preset(model, x, photos_val.label(1), photos_val.info, request,
                         generator=torch.Generator().manual_seed(0))
    assert outcome.kind == preset.kind and outcome.reconstruction.shape == x.shape
    assert outcome.steps >= 1
