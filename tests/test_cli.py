import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lavp_core.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_names_every_registry_entry(capsys):
    from lavp_core.data import list_datasets
    from lavp_core.losses import list_losses
    from lavp_core.models import list_models

    code, out, _ = _run(capsys, "list", "--json")
    listing = json.loads(out)
    assert code == 0
    assert [d["name"] for d in listing["datasets"]] == [d.name for d in list_datasets()]
    assert [m["name"] for m in listing["architectures"]] == [m.name for m in list_models()]
    assert [x["name"] for x in listing["losses"]] == [x.name for x in list_losses()]
    assert {"dlg", "idlg", "ig", "lavp-paper"} <= {p["name"] for p in listing["presets"]}


def test_attack_json_has_the_documented_keys(capsys, tmp_path):
    out_png = tmp_path / "rec.png"
    code, out, _ = _run(capsys, "attack", "--preset", "ig", "--steps", "5", "--index", "3", "--json",
                        "--out", str(out_png))
    assert code == 0
    payload = json.loads(out)
    for key in ("mse", "psnr", "ssim", "lpips", "matching_loss", "label", "steps", "seconds"):
        assert key in payload
    assert payload["steps"] == 5 and payload["lpips"] is None and payload["lpips_reason"]
    assert 0 < payload["mse"] < 1
    assert Image.open(out_png).size == (32, 32)


def test_attack_on_a_user_image_with_inferred_label(capsys, tmp_path):
    path = tmp_path / "me.png"
    Image.fromarray((np.random.default_rng(0).random((50, 40, 3)) * 255).astype(np.uint8)).save(path)
    code, out, _ = _run(capsys, "attack", "--preset", "idlg", "--steps", "2", "--image", str(path),
                        "--label", "4", "--json")
    payload = json.loads(out)
    assert code == 0 and payload["true_label"] == 4 and payload["label"] == 4


@pytest.mark.parametrize("argv, message", [
    (["attack", "--arch", "transformer"], "unknown architecture"),
    (["attack", "--preset", "magic"], "unknown attack preset"),
    (["attack", "--steps", "0"], "steps must be a positive integer"),
    (["attack", "--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "--download"),
    (["attack", "--weights", "/nonexistent.pt"], "does not exist"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_not_an_image_and_mismatched_checkpoint(capsys, tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_text("hello")
    code, _, err = _run(capsys, "attack", "--image", str(fake))
    assert code == 2 and "not a readable image" in err
    ckpt = tmp_path / "resnet.pt"
    from lavp_core.models import create_model

    torch.save(create_model("resnet8", 10).state_dict(), ckpt)
    code, _, err = _run(capsys, "attack", "--arch", "lenet", "--weights", str(ckpt))
    assert code == 2 and "does not fit architecture 'lenet'" in err


def test_module_entry_point_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "lavp_core", "attack", "--preset", "nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
