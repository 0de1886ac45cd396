"""GIFD: l1-ball projection, the staged attack on the shipped generator, the generator's training."""

from __future__ import annotations

import itertools

import pytest
import torch

from lavp_core.attacks import get_preset
from lavp_core.data import load_dataset
from lavp_core.errors import CheckpointError, ConfigError
from lavp_core.generative import (
    GENERATOR_PATH,
    DcganGenerator,
    GifdConfig,
    GifdResult,
    GifdRun,
    GifdSnapshot,
    gifd_config_from,
    learning_rate_factor,
    load_generator,
    project_l1_ball,
    run_gifd,
)
from lavp_core.gradients import client_update
from lavp_core.metrics import score_reconstruction
from lavp_core.models import create_model

SHORT = GifdConfig(steps=12, restarts=2)


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


# --------------------------------------------------------------------------------------------
# l1-ball projection


def test_projection_lands_inside_the_ball():
    v = torch.randn(6, 3, 5, 5, generator=_rng(1)) * 3
    center = torch.randn(6, 3, 5, 5, generator=_rng(2))
    radius = torch.tensor([0.0, 0.1, 1.0, 5.0, 20.0, 1e4])
    p = project_l1_ball(v, center, radius)
    l1 = (p - center).flatten(1).abs().sum(dim=1)
    assert torch.all(l1 <= radius * (1 + 1e-5) + 1e-6)
    outside = (v - center).flatten(1).abs().sum(dim=1) > radius
    assert torch.allclose(l1[outside], radius[outside], rtol=1e-4, atol=1e-5)  # on the boundary
    assert torch.equal(p[0], center[0])  # radius 0: the centre itself


def test_projection_leaves_points_inside_unchanged():
    center = torch.randn(1, 40, generator=_rng(3))
    offset = torch.randn(5, 40, generator=_rng(4))
    scale = torch.tensor([[0.0], [0.2], [0.5], [0.9], [1.0]])
    offset = offset / offset.abs().sum(dim=1, keepdim=True) * scale
    v = center + offset  # l1 distance <= 1 from the centre
    assert torch.equal(project_l1_ball(v, center, 1.0 + 1e-6), v)


def test_projection_mixed_rows_with_one_radius():
    center = torch.zeros(1, 3)
    v = torch.tensor([[0.1, 0.2, -0.1], [3.0, -1.0, 0.5]])
    p = project_l1_ball(v, center, 1.0)
    assert torch.equal(p[0], v[0])
    assert torch.allclose(p[1], torch.tensor([1.0, 0.0, 0.0]))  # threshold 2: (3, -1, .5) -> (1, 0, 0)


def _octahedron_surface(radius: float, n: int) -> torch.Tensor:
    """Dense points on the surface of the 3-D l1 ball: every face r * (s1 a, s2 b, s3 c), a + b + c = 1."""
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    a, b = torch.meshgrid(t, t, indexing="ij")
    keep = a + b <= 1
    a, b = a[keep], b[keep]
    face = torch.stack([a, b, 1 - a - b], dim=1)  # (m, 3)
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=3)), dtype=torch.float64)  # (8, 3)
    return (radius * signs[:, None, :] * face[None]).reshape(-1, 3)


@pytest.mark.parametrize("seed", range(6))
def test_projection_is_the_closest_point_brute_force_3d(seed):
    g = _rng(seed)
    center = torch.randn(1, 3, generator=g, dtype=torch.float64)
    v = center + 2.5 * torch.randn(1, 3, generator=g, dtype=torch.float64)
    radius = 0.5 + float(torch.rand(1, generator=g))
    if float((v - center).abs().sum()) <= radius:
        v = center + 3 * radius * torch.sign(v - center)
    p = project_l1_ball(v, center, radius)[0]
    surface = center[0] + _octahedron_surface(radius, 601)  # ~1.4 M candidate points
    distances = (surface - v[0]).norm(dim=1)
    best = surface[int(torch.argmin(distances))]
    assert float((p - v[0]).norm()) <= float(distances.min()) + 1e-9  # no grid point is closer
    assert torch.allclose(p, best, atol=1e-2)  # and it is (up to the grid step) the grid's closest


def test_projection_satisfies_the_optimality_condition():
    """For the Euclidean projection p of v onto a convex set: <v - p, y - p> <= 0 for every y in the set."""
    g = _rng(7)
    center = torch.randn(1, 10, generator=g, dtype=torch.float64)
    v = center + 4 * torch.randn(1, 10, generator=g, dtype=torch.float64)
    p = project_l1_ball(v, center, 2.0)
    y = torch.randn(2000, 10, generator=g, dtype=torch.float64)
    depth = torch.rand(2000, 1, generator=g, dtype=torch.float64)
    y = center + y / y.abs().sum(dim=1, keepdim=True) * 2.0 * depth
    assert float(((v - p) * (y - p)).sum(dim=1).max()) <= 1e-9


def test_projection_rejects_bad_radii():
    with pytest.raises(ConfigError):
        project_l1_ball(torch.zeros(2, 3), torch.zeros(1, 3), -1.0)
    with pytest.raises(ConfigError):
        project_l1_ball(torch.zeros(2, 3), torch.zeros(1, 3), torch.ones(3))


# --------------------------------------------------------------------------------------------
# Configuration, schedule, preset


def test_learning_rate_warms_up_then_ramps_down():
    factors = [learning_rate_factor(t, 100, 0.05, 0.25) for t in range(100)]
    assert factors[0] == pytest.approx(0.2)
    assert factors[4:75] == pytest.approx([1.0] * 71)
    assert all(b <= a for a, b in zip(factors[75:], factors[76:], strict=False))
    assert factors[-1] < 0.01


def test_preset_and_cli_mapping():
    preset = get_preset("gifd")
    assert preset.kind == "generative" and preset.config.loss == "cos"
    config = gifd_config_from(steps=400, restarts=3)
    assert (config.steps, config.restarts, config.total_steps) == (100, 3, 400)
    assert gifd_config_from().steps * 4 == preset.defaults().steps == preset.config.total_steps
    with pytest.raises(ConfigError):
        GifdConfig(radii=(0.3, 0.2, 0.1)).validated()
    with pytest.raises(ConfigError):
        GifdConfig(stages=4).validated()


# --------------------------------------------------------------------------------------------
# The shipped generator


def test_shipped_generator_loads_and_makes_images():
    assert GENERATOR_PATH.is_file() and GENERATOR_PATH.stat().st_size <= 10 * 2**20
    gan = load_generator()
    assert not gan.training and not any(p.requires_grad for p in gan.parameters())
    with torch.no_grad():
        images = gan(torch.randn(8, gan.latent_dim, generator=_rng()))
    assert images.shape == (8, 3, 32, 32)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert float(images.std(dim=0).mean()) > 0.02  # different latents make different images


def test_missing_or_broken_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(CheckpointError, match="train-generator"):
        load_generator(path=tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="retrain"):
        load_generator(path=broken)
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(3)}, wrong)
    with pytest.raises(CheckpointError):
        load_generator(path=wrong)


# --------------------------------------------------------------------------------------------
# The attack


@pytest.fixture(scope="module")
def photos_case():
    data = load_dataset("photos", "val")
    model = create_model("lenet", data.info.num_classes, seed=0)
    image01, label = data[0]
    image = data.info.normalize(image01).unsqueeze(0)
    return model, client_update(model, image, label), data.info, image


@pytest.fixture(scope="module")
def gan():
    return load_generator()


@pytest.fixture(scope="module")
def short_run(photos_case, gan):
    model, update, info, _ = photos_case
    run = GifdRun(model, update, SHORT, info, generator=_rng(), gan=gan, snapshot_every=4)
    snapshots = list(run)
    return run, snapshots


def test_short_run_lowers_the_matching_loss_at_every_kept_stage(short_run):
    run, snapshots = short_run
    result = run.result
    stages = result.stages
    assert [s.index for s in stages] == [0, 1, 2, 3]
    for stage in stages:
        assert stage.matching_loss <= stage.start_loss  # the kept restart ends no worse than the stage began
    for before, after in zip(stages, stages[1:], strict=False):
        # the next stage starts exactly where the previous one was kept
        assert after.start_loss == pytest.approx(before.matching_loss, rel=1e-4, abs=1e-6)
    assert stages[-1].matching_loss < 0.8 * stages[0].start_loss  # and the run as a whole makes progress
    assert result.best_stage == min(stages, key=lambda s: s.matching_loss).index
    assert result.matching_loss == min(s.matching_loss for s in stages)
    assert result.gradient_evaluations == 4 * (SHORT.steps + 1) * SHORT.restarts
    assert result.steps == SHORT.total_steps and not result.cancelled


def test_short_run_snapshots_and_result_shape(short_run, photos_case):
    run, snapshots = short_run
    *_, image = photos_case
    assert all(isinstance(s, GifdSnapshot) for s in snapshots)
    assert [s.stage for s in snapshots] == sorted(s.stage for s in snapshots)
    assert snapshots[-1].step == snapshots[-1].total_steps == SHORT.total_steps
    assert snapshots[0].image01.shape == (3, 32, 32) and len(snapshots[0].losses) == SHORT.restarts
    result = run.result
    assert isinstance(result, GifdResult)
    assert result.reconstruction.shape == (1, 3, 32, 32) == result.attack.reconstruction.shape
    assert all(s.image01.shape == (3, 32, 32) for s in result.stages)
    assert all(0 <= float(s.image01.min()) and float(s.image01.max()) <= 1 for s in result.stages)
    assert result.label_used == result.label_true
    scores = score_reconstruction(result.reconstruction, image, run.info)
    assert scores["psnr"] > 0


def test_run_is_deterministic_and_touches_neither_network(photos_case, gan, short_run):
    model, update, info, _ = photos_case
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    gan_before = {k: v.clone() for k, v in gan.state_dict().items()}
    again = run_gifd(model, update, info, SHORT, generator=_rng(), gan=gan)
    first = short_run[0].result
    assert torch.equal(again.reconstruction, first.reconstruction)
    assert [s.matching_loss for s in again.stages] == [s.matching_loss for s in first.stages]
    for before, module in ((model_before, model), (gan_before, gan)):
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[key])
        assert all(p.grad is None for p in module.parameters())
    assert not model.training and not gan.training
    assert not any(p.requires_grad for p in gan.parameters())


def test_cancel_stops_early(photos_case, gan):
    model, update, info, _ = photos_case
    run = GifdRun(model, update, GifdConfig(steps=50, restarts=1), info, generator=_rng(), gan=gan,
                  snapshot_every=5)
    for snapshot in run:
        if snapshot.step >= 10:
            run.cancel()
    result = run.result
    assert result.cancelled and result.steps < 50
    assert len(result.stages) == 1 and result.reconstruction is not None


def test_out_of_distribution_faces(gan):
    """The generator learned photos; the victim's image is an LFW face (grey, another distribution)."""
    data = load_dataset("faces", "val")
    model = create_model("lenet", data.info.num_classes, seed=1)
    image01, label = data[0]
    image = data.info.normalize(image01).unsqueeze(0)
    update = client_update(model, image, label)
    result = run_gifd(model, update, data.info, SHORT, generator=_rng(), gan=gan)
    assert len(result.stages) == 4
    assert result.stages[-1].matching_loss < result.stages[0].start_loss
    scores = score_reconstruction(result.reconstruction, image, data.info)
    assert torch.isfinite(torch.tensor(scores["psnr"]))


def test_other_image_sizes_are_refused(gan):
    model = create_model("lenet", 10, seed=0)
    update = client_update(model, torch.zeros(1, 3, 32, 32), 0)
    bad = type(update)(update.gradient, 0, (3, 64, 64))
    info = load_dataset("photos", "val").info
    with pytest.raises(ConfigError, match="3x32x32"):
        GifdRun(model, bad, SHORT, info, generator=_rng(), gan=gan)


# --------------------------------------------------------------------------------------------
# Training


def test_training_is_reproducible_and_resumable(tmp_path):
    from lavp_core.train_generator import GeneratorTrainConfig, train_generator

    config = GeneratorTrainConfig(epochs=2, batch_size=512, latent_dim=8, width=4, recalibration_batches=2)
    straight = train_generator(config, tmp_path / "a.pt", resume_path=tmp_path / "a.state", progress=False)
    train_generator(GeneratorTrainConfig(**{**config.__dict__, "epochs": 1}), tmp_path / "b.pt",
                    resume_path=tmp_path / "b.state", progress=False)
    resumed = train_generator(config, tmp_path / "b.pt", resume=True, resume_path=tmp_path / "b.state",
                              progress=False)
    assert len(straight.curve) == len(resumed.curve) == 2
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gan = load_generator(path=tmp_path / "a.pt")
    assert isinstance(gan, DcganGenerator) and gan.latent_dim == 8
    with pytest.raises(ConfigError, match="different settings"):
        train_generator(GeneratorTrainConfig(**{**config.__dict__, "width": 8}), tmp_path / "b.pt",
                        resume=True, resume_path=tmp_path / "b.state", progress=False)
