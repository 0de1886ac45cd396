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


# --- torch threads (--threads) and progress on stderr (--quiet) -------------------------------------------

TINY_ATTACK = ("attack", "--preset", "ig", "--steps", "2", "--index", "0", "--arch", "lenet", "--device", "cpu")


@pytest.fixture
def torch_threads():
    """Restore this process's torch thread count after a test that lets the CLI set it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["attack", "proxies", "study", "train", "train-generator"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_below_one_is_refused_in_one_line(capsys, torch_threads, command, value):
    before = torch.get_num_threads()
    code, out, err = _run(capsys, command, "--threads", value)
    assert code == 2 and out == ""
    assert err == f"error: --threads must be an integer of at least 1, got {value}\n"
    assert torch.get_num_threads() == before  # refused before anything was set or computed


def test_choose_threads_order_and_default(monkeypatch, torch_threads):
    from lavp_core.errors import ConfigError
    from lavp_core.system import DEFAULT_THREADS, choose_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert choose_threads(None) == DEFAULT_THREADS == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # someone chose it for this machine: respected
    assert choose_threads(None) == 2 and torch.get_num_threads() == 2
    assert choose_threads(1) == 1 and torch.get_num_threads() == 1  # --threads beats the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a positive integer: as if unset
    torch.set_num_threads(2)
    assert choose_threads(None) == 1 and torch.get_num_threads() == 1
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="at least 1"):
            choose_threads(bad)


def test_threads_option_is_applied_and_reported(capsys, monkeypatch, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    code, out, _ = _run(capsys, *TINY_ATTACK, "--threads", "1", "--json", "--quiet")
    assert code == 0 and json.loads(out)["threads"] == 1 and torch.get_num_threads() == 1
    code, out, _ = _run(capsys, *TINY_ATTACK, "--threads", "2", "--json", "--quiet")
    assert code == 0 and json.loads(out)["threads"] == 2 and torch.get_num_threads() == 2
    code, out, _ = _run(capsys, *TINY_ATTACK, "--json", "--quiet")  # the default
    assert code == 0 and json.loads(out)["threads"] == 1 and torch.get_num_threads() == 1


def test_json_is_one_object_on_stdout_and_progress_goes_to_stderr(capsys, torch_threads):
    code, out, err = _run(capsys, *TINY_ATTACK, "--json")
    assert code == 0
    assert out.count("\n") == 1 and isinstance(json.loads(out), dict)
    lines = err.splitlines()
    assert lines[0].startswith("attack ig: photos/val #0") and "2 steps on cpu, 1 torch thread(s)" in lines[0]
    assert any(line.startswith("attack ig: step 1/2 (50%)") and "matching loss" in line and "ETA" in line
               for line in lines)
    payload = json.loads(out)
    assert lines[-1].startswith("attack ig: 2 steps in ")
    assert lines[-1].endswith(f"matching loss {payload['matching_loss']:.6g}")
    assert "\r" not in err  # not a terminal: plain lines
    code, out, err = _run(capsys, "proxies", "--method", "paper", "--paper-iterations", "3", "--losses", "l2",
                          "--json")
    assert code == 0 and out.count("\n") == 1 and "values" in json.loads(out)
    assert err.splitlines()[0].startswith("proxies: photos/val #0") and "done in" in err.splitlines()[-1]


def test_quiet_leaves_stderr_empty(capsys, torch_threads):
    code, out, err = _run(capsys, *TINY_ATTACK, "--json", "--quiet")
    assert code == 0 and err == "" and json.loads(out)["steps"] == 2
    code, out, err = _run(capsys, *TINY_ATTACK, "--quiet")  # the text report still comes, on stdout
    assert code == 0 and err == "" and out.startswith("image        photos/val #0")
    code, out, err = _run(capsys, "proxies", "--method", "paper", "--paper-iterations", "3", "--losses", "l2",
                          "--quiet")
    assert code == 0 and err == "" and "grad_norm" in out


def test_one_and_two_threads_give_the_same_results(capsys, torch_threads):
    results = {}
    for threads in ("1", "2"):
        _, out, _ = _run(capsys, "attack", "--preset", "ig", "--steps", "5", "--index", "0", "--device", "cpu",
                         "--threads", threads, "--json", "--quiet")
        attack = json.loads(out)
        # l2 only: the paper recipe's cosine values are finite differences of float32 gradients, which turn
        # the summation order's rounding (it differs with the thread count) into ~3e-5 relative differences
        _, out, _ = _run(capsys, "proxies", "--method", "paper", "--paper-iterations", "5", "--losses", "l2",
                         "--device", "cpu", "--threads", threads, "--json", "--quiet")
        results[threads] = (attack, json.loads(out)["values"])
    (a1, p1), (a2, p2) = results["1"], results["2"]
    assert a1["threads"] == 1 and a2["threads"] == 2
    assert a1["matching_loss"] == pytest.approx(a2["matching_loss"], rel=1e-5, abs=1e-8)
    assert a1["mse"] == pytest.approx(a2["mse"], rel=1e-5, abs=1e-8)
    assert set(p1) == set(p2) == {"grad_norm", "l2_max", "l2_min"}
    for key in p1:
        assert p1[key] == pytest.approx(p2[key], rel=1e-5), key


def test_the_module_entry_point_applies_threads_and_keeps_stdout_one_object():
    proc = subprocess.run([sys.executable, "-m", "lavp_core", *TINY_ATTACK, "--steps", "1", "--threads", "1",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)  # the whole of stdout is one object
    assert payload["threads"] == 1 and payload["steps"] == 1
    assert "1 torch thread(s)" in proc.stderr and "attack ig: 1 steps in" in proc.stderr


def test_progress_is_rate_limited_and_uses_carriage_returns_on_a_terminal():
    import io

    from lavp_core.commands.progress import LOG_INTERVAL, TTY_INTERVAL, Progress, end_open_line

    class Clock:
        now = 100.0

        def __call__(self):
            return self.now

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock, log = Clock(), io.StringIO()
    progress = Progress("attack ig", stream=log, clock=clock)
    for step in range(1, 1001):  # a thousand steps within one interval: only the first is shown
        clock.now += LOG_INTERVAL / 2000
        progress.step(step, 4000, 0.5)
    assert log.getvalue().count("\n") == 1 and "step 1/4000" in log.getvalue()
    clock.now += LOG_INTERVAL
    progress.step(1001, 4000, 0.25)
    last = log.getvalue().splitlines()[-1]
    assert "step 1001/4000 (25%)" in last and "matching loss 0.25" in last and "0:07 elapsed, ETA 0:22" in last
    progress.finish("done")
    assert log.getvalue().splitlines()[-1] == "attack ig: done"

    clock, screen = Clock(), Terminal()
    progress = Progress("attack ig", stream=screen, clock=clock)
    for step in range(1, 101):
        clock.now += TTY_INTERVAL / 10
        progress.step(step, 100, float("nan"))
    text = screen.getvalue()
    assert "\n" not in text and 2 <= text.count("\r") <= 12  # rewritten in place, a few times a second
    assert "matching loss n/a" in text
    progress.finish("done")
    assert screen.getvalue().endswith("\rattack ig: done" + " " * (len(text.split("\r")[-1]) - 15) + "\n")
    end_open_line()  # nothing open after finish: writes nothing
    assert screen.getvalue().count("\n") == 1
    clock.now += TTY_INTERVAL
    progress.step(5, 10, 0.5)  # an open line, then an error: the error must start on a line of its own
    end_open_line()
    assert screen.getvalue().endswith("step 5/10 (50%)   matching loss 0.5   0:03 elapsed, ETA 0:03\n")
    assert screen.getvalue().count("\n") == 2

    quiet = io.StringIO()
    progress = Progress("attack ig", stream=quiet, quiet=True)
    progress.note("set-up")
    progress.step(1, 2, 0.1)
    progress.finish("done")
    assert quiet.getvalue() == ""


def test_compile_is_the_compiled_engine_and_engine_defaults_to_auto():
    from lavp_core.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["attack", "--compile"]).engine == "compiled"
    assert parser.parse_args(["attack"]).engine is None  # the request then says auto
    assert parser.parse_args(["attack", "--engine", "traced"]).engine == "traced"
    assert parser.parse_args(["study", "--compile"]).engine == "compiled"
    assert parser.parse_args(["study"]).engine == "auto"
