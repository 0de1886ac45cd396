import pytest
import torch

from lavp_core.errors import CheckpointError, ConfigError
from lavp_core.models import create_model, list_models


@pytest.mark.parametrize("spec", list_models(), ids=lambda s: s.name)
def test_every_architecture_builds_and_classifies(spec):
    model = create_model(spec.name, 7, seed=1)
    x = torch.zeros(1, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        assert model(x).shape == (1, 7)
    assert not model.training


def test_random_weights_reproducible_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = create_model("resnet8", 10, seed=5)
    b = create_model("resnet8", 10, seed=5)
    c = create_model("resnet8", 10, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_lenet_uses_dlg_uniform_init():
    params = torch.cat([p.detach().flatten() for p in create_model("lenet", 10, seed=0).parameters()])
    assert float(params.min()) >= -0.5 and float(params.max()) <= 0.5
    assert abs(float(params.mean())) < 0.01 and abs(float(params.std()) - (1 / 12) ** 0.5) < 0.01


def test_checkpoint_round_trip(tmp_path):
    model = create_model("lenet", 10, seed=3)
    path = tmp_path / "lenet.pt"
    torch.save(model.state_dict(), path)
    loaded = create_model("lenet", 10, weights=str(path))
    for (n, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), n


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    path = tmp_path / "lenet5.pt"
    torch.save(create_model("lenet", 5, seed=0).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"fc\.weight: checkpoint \(5, 768\) vs model \(10, 768\)"):
        create_model("lenet", 10, weights=str(path))
    other = tmp_path / "resnet8.pt"
    torch.save(create_model("resnet8", 10).state_dict(), other)
    with pytest.raises(CheckpointError, match="missing keys.*body"):
        create_model("lenet", 10, weights=str(other))


def test_unreadable_and_missing_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        create_model("lenet", 10, weights=str(junk))
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("lenet", 10, weights=str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="python -m lavp_core train"):
        create_model("lenet", 10, weights="trained", dataset="no-such-dataset")


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="lenet"):
        create_model("vit", 10)


def test_training_keeps_snapshots_and_weights_name_them(tmp_path, monkeypatch):
    """Epoch 0 is the initialisation the run starts from; trained@E loads the model after epoch E; a
    snapshot of another architecture is refused; a missing epoch names the ones there are."""
    import json

    from lavp_core import models
    from lavp_core.errors import CheckpointError
    from lavp_core.train import TrainConfig, train

    monkeypatch.setattr(models, "CHECKPOINT_DIR", tmp_path)
    out = models.trained_checkpoint_path("lenet", "photos")
    config = TrainConfig(arch="lenet", dataset="photos", epochs=2, batch_size=64, seed=3)
    train(config, out, snapshots=(0, 2), command="test")
    init = create_model("lenet", 10, seed=3)  # what training starts from: seed 3's random weights
    first = create_model("lenet", 10, weights="trained@0", dataset="photos")
    for (name, a), b in zip(init.state_dict().items(), first.state_dict().values()):
        assert torch.equal(a, b), name
    last = create_model("lenet", 10, weights="trained@2", dataset="photos")
    final = create_model("lenet", 10, weights="trained", dataset="photos")
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), final.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), last.state_dict().values()))
    record = json.loads((tmp_path / "lenet-photos-epoch2.json").read_text())
    assert record["epoch"] == 2 and record["arch"] == "lenet" and len(record["sha256"]) == 64
    assert models.available_snapshots("lenet", "photos") == [0, 2]
    with pytest.raises(CheckpointError, match="available: trained@0, trained@2"):
        create_model("lenet", 10, weights="trained@1", dataset="photos")
    (tmp_path / "resnet8-photos-epoch0.pt").write_bytes((tmp_path / "lenet-photos-epoch0.pt").read_bytes())
    with pytest.raises(CheckpointError, match="does not fit architecture 'resnet8'"):
        create_model("resnet8", 10, weights="trained@0", dataset="photos")
    with pytest.raises(ConfigError, match="give an epoch number"):
        create_model("lenet", 10, weights="trained@last", dataset="photos")
