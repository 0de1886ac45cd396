"""Walk every registry with a tiny run, so a new entry cannot be registered broken."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lavp_core.attacks import preset_config, run_attack
from lavp_core.data import list_datasets, load_dataset
from lavp_core.errors import ConfigError, DatasetError
from lavp_core.gradients import client_update
from lavp_core.losses import list_losses
from lavp_core.models import create_model, list_models
from lavp_core.presets import AttackKind, AttackPreset, AttackRequest, list_kinds, list_presets, register_kind
from lavp_core.presets import register_preset as add_preset
from lavp_core.runner import PresetRun, run_preset


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


@pytest.mark.parametrize("preset", list_presets(), ids=lambda p: p.name)
def test_every_preset_runs_through_the_front_door(preset, photos_val):
    kind = preset.attack_kind
    arch = "cnn-rconv" if not kind.settings else "lenet"  # R-CONV (no settings) needs a conv/linear chain
    model = create_model(arch, 10, seed=0)
    x = photos_val.info.normalize(photos_val[1][0])[None]
    request = AttackRequest(preset=preset.name, steps=4 if "steps" in kind.settings else None, restarts=2)
    outcome = run_preset(model, x, photos_val.label(1), photos_val.info, request,
                         generator=torch.Generator().manual_seed(0))
    assert outcome.kind == preset.kind and outcome.reconstruction.shape == x.shape
    # 4 steps (batched restarts) or 4 per restart (L-BFGS restarts one after another); R-CONV: one solve
    assert outcome.steps in ((4, 8) if "steps" in kind.settings else (1,))
    defaults = preset.defaults()
    assert all(getattr(defaults, name) is not None for name in kind.settings)


def test_the_registry_is_complete_whatever_was_imported_first():
    """A fresh interpreter that imports only the package sees every preset and kind."""
    code = ("import lavp_core; print(','.join(p.name for p in lavp_core.list_presets())); "
            "from lavp_core.presets import list_kinds; print(','.join(k.name for k in list_kinds()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    presets, kinds = out.stdout.split()
    assert presets.split(",") == ["dlg", "idlg", "ig", "lavp-paper", "rconv", "gifd"]
    assert kinds.split(",") == ["optimisation", "analytic", "generative"]


def test_a_new_kind_is_one_class_and_its_registration(monkeypatch, photos_val, lenet):
    """The seam: a kind registered from outside the package runs through the front door unchanged."""
    from lavp_core import presets

    monkeypatch.setattr(presets, "_KINDS", dict(presets._KINDS))
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))

    class Truth(AttackKind):  # an "attack" that returns the mean colour: enough to exercise the seam
        name = "oracle-test"
        summary = "test kind"
        settings = ("steps",)

        def defaults(self, preset):
            return AttackRequest(preset.name, steps=preset.config)

        def start(self, preset, model, image, label, info, request, *, generator, device, snapshot_every):
            steps = request.steps or preset.config

            class Run:
                total_steps = steps
                outcome = None

                def cancel(self):
                    pass

                def __iter__(run):
                    yield None
                    run.outcome = presets.AttackOutcome(preset.name, preset.kind, image.mean((2, 3), keepdim=True)
                                                        .expand_as(image), 0.0, label, label, steps, 0.0, False)
            return Run()

    register_kind(Truth())
    add_preset(AttackPreset("mean-colour", "test", "oracle-test", 7))
    assert "oracle-test" in [k.name for k in list_kinds()]
    x = photos_val.info.normalize(photos_val[0][0])[None]
    run = PresetRun(lenet, x, 3, photos_val.info, AttackRequest("mean-colour"), generator=torch.Generator())
    assert run.total_steps == 7 and list(run) == [None]
    assert run.outcome.kind == "oracle-test" and run.outcome.reconstruction.shape == x.shape
    with pytest.raises(ConfigError, match="not registered"):
        add_preset(AttackPreset("orphan", "test", "no-such-kind"))


def test_a_kind_refuses_a_model_it_cannot_attack_and_names_what_to_choose(lenet, photos_val):
    from lavp_core.errors import UnsupportedModelError
    from lavp_core.presets import get_preset

    choose = r"Choose an architecture R-CONV inverts \(cnn-rconv, mlp-rconv\)"
    with pytest.raises(UnsupportedModelError, match=choose):  # batch norm: refused before running
        get_preset("rconv").attack_kind.check_model(create_model("vgg9", 10, seed=0), (3, 32, 32))
    x = photos_val.info.normalize(photos_val[0][0])[None]
    with pytest.raises(UnsupportedModelError, match=choose):  # lenet passes the layer check, fails on rank
        run_preset(lenet, x, photos_val.label(0), photos_val.info, AttackRequest("rconv"),
                   generator=torch.Generator())
    get_preset("rconv").attack_kind.check_model(create_model("cnn-rconv", 10, seed=0), (3, 32, 32))
    get_preset("ig").attack_kind.check_model(lenet, (3, 32, 32))  # the engine attacks any classifier
