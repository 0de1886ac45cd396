import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_model_unchanged, snapshot_model

from lavp_core.attacks import AttackRun, list_presets, preset_config, run_attack, total_variation
from lavp_core.errors import ConfigError
from lavp_core.gradients import client_update
from lavp_core.metrics import score_reconstruction
from lavp_core.models import create_model


def _target(photos_val, index, model):
    x01, y = photos_val[index]
    x = photos_val.info.normalize(x01)[None]
    return x, client_update(model, x, y)


@pytest.mark.slow
def test_dlg_rebuilds_a_photo_on_random_lenet(photos_val, lenet):
    x, update = _target(photos_val, 3, lenet)
    config = preset_config("dlg", steps=150, restarts=3)  # seed 0: one restart gets below 1e-6 by step 150
    result = run_attack(lenet, update, config, photos_val.info, generator=torch.Generator().manual_seed(0))
    scores = score_reconstruction(result.reconstruction, x, photos_val.info)
    assert scores["psnr"] >= 30.0, scores


def test_ig_lowers_matching_loss_and_raises_psnr(photos_val, lenet):
    x, update = _target(photos_val, 5, lenet)
    config = preset_config("ig", steps=150)
    run = AttackRun(lenet, update, config, photos_val.info, generator=torch.Generator().manual_seed(1),
                    snapshot_every=1000)
    snapshots = list(run)
    first = snapshots[0]  # taken after the first step: its loss is that of the initialisation
    init = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    init_scores = score_reconstruction(init, x, photos_val.info)
    end_scores = score_reconstruction(run.result.reconstruction, x, photos_val.info)
    assert run.result.matching_loss < 0.5 * first.matching_loss
    assert end_scores["psnr"] > init_scores["psnr"] + 1.0


def test_attack_leaves_the_model_untouched(photos_val):
    model = create_model("resnet8", 10, seed=0)
    model.fc.bias.grad = torch.zeros_like(model.fc.bias)
    before = snapshot_model(model)
    _, update = _target(photos_val, 1, model)
    for preset in ("ig", "dlg"):
        run_attack(model, update, preset_config(preset, steps=2, restarts=2, lbfgs_max_iter=2), photos_val.info,
                   generator=torch.Generator().manual_seed(0))
    assert_model_unchanged(model, before)


def test_batched_restarts_equal_independent_runs(photos_val, lenet):
    _, update = _target(photos_val, 2, lenet)
    config = preset_config("ig", steps=12, restarts=3)
    starts = torch.randn((3, 3, 32, 32), generator=torch.Generator().manual_seed(9))
    batched = AttackRun(lenet, update, config, photos_val.info, generator=torch.Generator(), initial=starts)
    list(batched)
    single_config = preset_config("ig", steps=12, restarts=1)
    for r in range(3):
        alone = AttackRun(lenet, update, single_config, photos_val.info, generator=torch.Generator(),
                          initial=starts[r:r + 1])
        list(alone)
        assert alone.result.restart_losses[0] == pytest.approx(batched.result.restart_losses[r], rel=1e-4)
    assert batched.result.matching_loss == min(batched.result.restart_losses)


def test_same_seed_same_result_and_no_global_seeding(photos_val, lenet):
    _, update = _target(photos_val, 0, lenet)
    config = preset_config("lavp-paper", steps=5)
    state = torch.random.get_rng_state()
    a = run_attack(lenet, update, config, photos_val.info, generator=torch.Generator().manual_seed(3))
    b = run_attack(lenet, update, config, photos_val.info, generator=torch.Generator().manual_seed(3))
    c = run_attack(lenet, update, config, photos_val.info, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert not torch.equal(a.reconstruction, c.reconstruction)


def test_snapshots_stream_and_cancel_stops_between_steps(photos_val, lenet):
    _, update = _target(photos_val, 0, lenet)
    run = AttackRun(lenet, update, preset_config("ig", steps=500, restarts=2), photos_val.info,
                    generator=torch.Generator().manual_seed(0), snapshot_every=5)
    seen = []
    for snap in run:
        seen.append(snap)
        assert snap.image01.shape == (3, 32, 32) and 0 <= float(snap.image01.min())
        assert len(snap.losses) == 2
        if snap.step >= 20:
            run.cancel()
    assert [s.step for s in seen] == [1, 5, 10, 15, 20]
    assert run.result.cancelled and run.result.steps == 20
    assert run.result.reconstruction is not None


class _Exploding(nn.Module):
    """Finite near zero, overflows (inf/NaN gradients) for large inputs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.exp(20 * x.flatten(1)[:, :4]))


def test_diverging_candidates_are_dropped_and_reported():
    from lavp_core.data import DatasetInfo

    info = DatasetInfo("toy", 3, (1, 2, 2), (0.0,), (1.0,), ("a", "b", "c"))
    model = _Exploding()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    update = client_update(model, torch.full((1, 1, 2, 2), 0.1), 1)
    config = preset_config("ig", steps=4, restarts=2, signed=False, boxed=False, tv_weight=0.0)
    starts = torch.stack([torch.full((1, 2, 2), 0.05), torch.full((1, 2, 2), 10.0)])
    run = AttackRun(model, update, config, info, generator=torch.Generator(), initial=starts)
    list(run)
    assert run.result.diverged == (False, True)
    assert run.result.best_restart == 0 and math.isfinite(run.result.matching_loss)
    assert math.isnan(run.result.restart_losses[1])
    both_bad = AttackRun(model, update, config, info, generator=torch.Generator(),
                         initial=torch.full((2, 1, 2, 2), 10.0))
    list(both_bad)
    assert both_bad.result.all_diverged and both_bad.result.reconstruction is None


def test_total_variation_of_known_images():
    flat = torch.ones(1, 3, 4, 4)
    assert float(total_variation(flat)) == 0.0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1.0  # every horizontal neighbour differs by 1, vertical ones by 0
    assert float(total_variation(stripes)) == pytest.approx(1.0)


@pytest.mark.parametrize("bad, message", [
    ({"steps": 0}, "steps must be a positive"),
    ({"steps": -5}, "steps must be a positive"),
    ({"restarts": 0}, "restarts"),
    ({"lr": 0.0}, "learning rate"),
    ({"loss": "huber"}, "unknown matching loss"),
    ({"optimizer": "sgd"}, "unknown optimizer"),
])
def test_bad_settings_are_rejected(bad, message):
    with pytest.raises(ConfigError, match=message):
        preset_config("ig", **bad)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="dlg"):
        preset_config("deepleak")
    assert {"dlg", "idlg", "ig", "lavp-paper"} <= {p.name for p in list_presets()}
