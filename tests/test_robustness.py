"""Bad input, hostile files and broken environments: each is refused with one clear line (CLI: ``error: …``
and exit status 2; library: a :class:`~lavp_core.errors.LavpError`), and nothing stored is lost.

The app's side (uploads, orphaned jobs, database choices) is in ``tests/test_app.py``; the background
job board in ``tests/test_jobs.py``; mode-by-mode image decoding in ``tests/test_data.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lavp_core.cli import main
from lavp_core.data import MAX_IMAGE_PIXELS, load_image
from lavp_core.errors import CheckpointError, ConfigError, ImageError, StoreError
from lavp_core.models import create_model, read_state_dict
from lavp_core.store import open_store

ROOT = Path(__file__).resolve().parent.parent
MARKER = "lavp-robustness-pwned"


# ---- hostile and broken files, made here ----------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A greyscale PNG of ``width`` x ``height`` zero pixels, compressed as a decompression bomb is; with
    ``rows`` only that many rows of data follow the header (the header is what a size check reads)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
    body += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


class _Evil:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hostile")
    made = {}
    made["bomb_13k"] = base / "bomb-13000.png"  # the 164 KB grey PNG of 13,000 x 13,000
    made["bomb_13k"].write_bytes(grey_png(13_000, 13_000))
    made["bomb_20k"] = base / "bomb-20000.png"
    made["bomb_20k"].write_bytes(grey_png(20_000, 20_000, rows=64))
    made["bomb_100k"] = base / "bomb-100000.png"  # declares 100,000 x 100,000
    made["bomb_100k"].write_bytes(grey_png(100_000, 100_000, rows=1))
    made["over_limit"] = base / "over-limit.png"  # 60 MP: under Pillow's guard, over ours
    made["over_limit"].write_bytes(grey_png(10_000, 6_000, rows=1))
    made["photo"] = base / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(made["photo"])
    model = create_model("lenet", 10)
    state = model.state_dict()
    state["fc.bias"] = state["fc.bias"].clone()
    state["fc.bias"][3] = float("nan")
    made["nan_ckpt"] = base / "nan.pt"
    torch.save(state, made["nan_ckpt"])
    state = model.state_dict()
    made["inf_ckpt"] = base / "inf.pt"
    torch.save({**state, "body.0.weight": torch.full_like(state["body.0.weight"], float("inf"))}, made["inf_ckpt"])
    made["evil_ckpt"] = base / "evil.pt"
    made["evil_marker"] = base / MARKER
    torch.save({"fc.weight": _Evil(made["evil_marker"])}, made["evil_ckpt"])
    made["passwd"] = base / "passwd"
    made["passwd"].write_text("root:x:0:0:root:/root:/bin/bash\n")
    made["folder"] = base / "a-folder"
    made["folder"].mkdir()
    return made


def corrupt_data_pages(path: Path) -> None:
    """Overwrite the data pages of a results database (every page after the schema's) with noise, keeping
    its header and schema: the file opens, and fails when a query reaches a damaged page."""
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    last_root = max(r[0] for r in conn.execute("SELECT rootpage FROM sqlite_master"))
    conn.close()
    data = bytearray(path.read_bytes())
    noise = bytes((i * 37 + 11) % 256 for i in range(page_size // 2))
    for page in range(last_root, pages):  # page n (1-based) starts at (n - 1) * page_size
        start = page * page_size + 8
        data[start:start + len(noise)] = noise
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def results_db(tmp_path_factory) -> Path:
    """A small results database written through the store (as a study writes it), closed (WAL mode)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_app import make_study_db

    return make_study_db(tmp_path_factory.mktemp("db") / "study.sqlite")


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ---- the command line: every case of the issue, one error line each --------------------------------------

CLI_CASES = {
    # name: (argv with {file} placeholders, fragment of the message)
    "bomb 13,000 x 13,000 PNG": (["attack", "--image", "{bomb_13k}"], "169 megapixels"),
    "bomb 20,000 x 20,000 PNG": (["attack", "--image", "{bomb_20k}"], "400 megapixels"),
    "PNG declaring 100,000 x 100,000": (["attack", "--image", "{bomb_100k}"], "10000 megapixels"),
    "60 MP image (over our limit, under Pillow's)": (["attack", "--image", "{over_limit}"], "at most 50 megapixels"),
    "--device foo": (["attack", "--device", "foo"], "unknown device 'foo'"),
    "--device cuda:99": (["attack", "--device", "cuda:99"], "cuda"),
    "--device mps": (["attack", "--device", "mps"], "use --device cpu or --device cuda"),
    "--seed beyond 64 bits": (["attack", "--seed", "99999999999999999999999"], "seeds are 64-bit"),
    "--seed negative": (["attack", "--seed", "-1"], "from 0 to"),
    "study --seed beyond 64 bits": (["study", "--seed", "99999999999999999999999", "--weights", "random"],
                                    "seeds are 64-bit"),
    "train --seed negative": (["train", "--seed", "-1", "--epochs", "1"], "from 0 to"),
    "train-generator --seed beyond 64 bits": (["train-generator", "--seed", "99999999999999999999999"],
                                              "seeds are 64-bit"),
    "--out into a missing folder": (["attack", "--out", "{folder}/no/such/rec.png"], "does not exist"),
    "--out a directory": (["attack", "--out", "{folder}"], "is a folder"),
    "--out without an extension": (["attack", "--out", "{folder}/reconstruction"], ".png or .jpg"),
    "--out with another extension": (["attack", "--out", "{folder}/rec.gif"], ".png or .jpg"),
    "--label without --image": (["attack", "--label", "3"], "--label is the label of --image"),
    "--index with --image": (["attack", "--image", "{photo}", "--index", "4"], "drop one of them"),
    "--download for a bundled dataset": (["attack", "--download"], "fetches CIFAR only"),
    "--steps for R-CONV (no settings)": (["attack", "--preset", "rconv", "--steps", "5"], "would do nothing"),
    "--schedule for GIFD": (["attack", "--preset", "gifd", "--schedule", "step"], "--schedule would do nothing"),
    "--engine unknown": (["attack", "--preset", "ig", "--engine", "fast"],
                         "unknown engine 'fast': choose one of auto, eager, traced, compiled"),
    "--engine for R-CONV": (["attack", "--preset", "rconv", "--engine", "traced"], "--engine would do nothing"),
    "study --engine unknown": (["study", "--db", "{folder}/s.sqlite", "--archs", "lenet", "--weights", "random",
                                "--images", "1", "--engine", "jit", "--no-progress"], "unknown engine 'jit'"),
    "checkpoint with a NaN": (["attack", "--weights", "{nan_ckpt}"], "NaN or infinite values in fc.bias"),
    "checkpoint with infinities": (["attack", "--weights", "{inf_ckpt}"], "in body.0.weight"),
    "malicious checkpoint": (["attack", "--weights", "{evil_ckpt}"], "the Python object posix.system"),
    "proxies --spectrum without --json": (["proxies", "--spectrum"], "give --json too"),
    "proxies --paper-iterations with another method": (["proxies", "--paper-iterations", "5"],
                                                        "would do nothing"),
    "proxies --device foo": (["proxies", "--device", "foo"], "unknown device"),
    "report on a text file": (["report", "--db", "{passwd}"], "not an SQLite database"),
    "study --images beyond the split": (["study", "--db", "{folder}/s.sqlite", "--archs", "lenet", "--weights",
                                         "random", "--images", "100000", "--no-progress"], "holds 160"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_command_lines_are_one_error_line_and_status_2(case, files, capsys):
    argv, fragment = CLI_CASES[case]
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    code, out, err = _run(capsys, *argv)
    message = _one_error_line(code, err)
    assert fragment in message, message
    assert out == ""  # nothing ran: every check comes before the work
    assert "root:x" not in message  # no message quotes a file's contents
    assert not files["evil_marker"].exists()  # the malicious checkpoint ran nothing
    assert not (files["folder"] / "s.sqlite").exists()  # the refused study wrote nothing


def test_cuda_asked_for_on_a_machine_without_one(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = _run(capsys, "attack", "--device", "cuda")
    assert "no CUDA GPU is available" in _one_error_line(code, err) and out == ""


def test_the_malicious_checkpoint_message_is_whole_and_nothing_runs(files):
    with pytest.raises(CheckpointError) as caught:
        create_model("lenet", 10, weights=str(files["evil_ckpt"]))
    message = str(caught.value)
    assert not files["evil_marker"].exists()
    assert "posix.system" in message and "(loading it could run code)" in message
    assert message.endswith("torch.save(model.state_dict(), path)")


def test_long_load_errors_are_shortened_at_a_word_boundary():
    from lavp_core.models import _load_failure

    text = _load_failure(RuntimeError("abcdefghij " * 40))
    assert text.endswith(" …") and text[:-2].split()[-1] == "abcdefghij"
    assert len(text) < 240


def test_a_checkpoint_with_non_finite_values_is_refused_by_name(files):
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in fc\.bias"):
        read_state_dict(files["nan_ckpt"])
    with pytest.raises(CheckpointError, match=r"in body\.0\.weight:"):
        create_model("lenet", 10, weights=str(files["inf_ckpt"]))


def test_the_module_entry_point_prints_one_line_for_a_bomb_and_no_warning(files):
    """Pillow warns (DecompressionBombWarning) from 89 megapixels: that must not reach stderr either."""
    proc = subprocess.run([sys.executable, "-m", "lavp_core", "attack", "--image", str(files["bomb_13k"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Warning" not in proc.stderr


def test_bombs_are_refused_before_decoding(files):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in ("bomb_13k", "bomb_20k", "bomb_100k", "over_limit"):
        with pytest.raises(ImageError, match="megapixels"):
            load_image(files[name])
        with pytest.raises(ImageError, match="megapixels"):
            load_image(files[name].read_bytes())
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # Linux: kilobytes
    assert grown_mb < 100, f"peak memory grew by {grown_mb:.0f} MB: something was decoded"
    # a per-call limit, below the default, without touching Pillow's process-wide one
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 and MAX_IMAGE_PIXELS == 50_000_000
    with pytest.raises(ImageError, match="at most 0.001 megapixels"):
        load_image(files["photo"], max_pixels=1000)
    assert load_image(files["photo"], max_pixels=40 * 48).shape == (3, 32, 32)


def test_out_is_written_after_the_scores_are_printed(files, capsys, tmp_path):
    out = tmp_path / "rec.jpg"
    code, text, err = _run(capsys, "attack", "--preset", "ig", "--steps", "3", "--quiet", "--out", out)
    assert code == 0 and err == ""
    lines = text.splitlines()
    assert lines[-1] == f"saved        {out}" and any(line.startswith("MSE ") for line in lines[:-1])
    assert Image.open(out).format == "JPEG" and Image.open(out).size == (32, 32)


def test_a_failing_save_still_prints_the_scores_first(capsys, tmp_path, monkeypatch):
    """The disk fills up while the attack runs: the scores are out, then one error line."""

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    code, text, err = _run(capsys, "attack", "--preset", "ig", "--steps", "3", "--json", "--quiet",
                           "--out", tmp_path / "r.png")
    payload = json.loads(text)
    assert payload["steps"] == 3 and 0 < payload["mse"]
    assert "No space left on device" in _one_error_line(code, err) and "scores above are complete" in err


# ---- databases -------------------------------------------------------------------------------------------


def test_report_on_a_database_with_a_damaged_data_page(results_db, tmp_path, capsys):
    damaged = tmp_path / "damaged.sqlite"
    shutil.copy(results_db, damaged)
    corrupt_data_pages(damaged)
    before = damaged.read_bytes()
    code, out, err = _run(capsys, "report", "--db", damaged)
    assert "malformed" in _one_error_line(code, err) and "nothing was changed" in err
    with open_store(damaged, readonly=True) as store:  # the header and schema still open
        with pytest.raises(StoreError, match="cannot read results database"):
            store.job_rows()
    assert damaged.read_bytes() == before


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_a_read_only_open_creates_no_file(results_db, tmp_path, journal):
    """'report' and the app open databases read-only: no -wal, -shm or -journal file may appear, while the
    database is open or after."""
    folder = tmp_path / journal
    folder.mkdir()
    path = folder / "study.sqlite"
    shutil.copy(results_db, path)
    if journal == "delete":
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.close()
    before = path.read_bytes()
    with open_store(path, readonly=True) as store:
        rows = store.job_rows(with_images=True)
        assert len(rows) == 12 and store.studies() and store.proxy_rows()
        assert sorted(os.listdir(folder)) == ["study.sqlite"]
    assert main(["report", "--db", str(path), "--format", "csv"]) == 0
    assert sorted(os.listdir(folder)) == ["study.sqlite"] and path.read_bytes() == before


def test_a_reader_beside_a_running_writer_sees_its_rows(results_db, tmp_path):
    """While a study writes (its -wal and -shm are there), a reader uses them and sees the new rows."""
    path = tmp_path / "live.sqlite"
    shutil.copy(results_db, path)
    writer = open_store(path)
    try:
        row = {k: v for k, v in open_store(results_db, readonly=True).job_rows()[0].items() if v is not None}
        writer.write_job({**row, "job_key": "f" * 64})
        with open_store(path, readonly=True) as reader:
            assert reader.count() == 13
    finally:
        writer.close()


def test_store_messages_never_quote_the_file(files, tmp_path):
    for readonly in (True, False):
        with pytest.raises(StoreError) as caught:
            open_store(files["passwd"], readonly=readonly)
        assert "root" not in str(caught.value).replace(str(files["passwd"]), "")
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('app', 'secret-value-42'), ('schema_version', 'x')")
    conn.execute("CREATE TABLE private_customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as caught:
        open_store(other, readonly=True)
    assert "secret-value-42" not in str(caught.value) and "another program" in str(caught.value)


# ---- counts beyond the data --------------------------------------------------------------------------------


def test_a_study_larger_than_its_split_says_so():
    from lavp_core.study import StudyConfig, plan_study

    with pytest.raises(ConfigError, match="160"):
        plan_study(StudyConfig(archs=("lenet",), weights="random", images=100_000))
    assert len(plan_study(StudyConfig(archs=("lenet",), weights="random", losses=("l2",), images=160)).images) == 160


def test_a_sixteen_bit_upload_on_the_command_line(capsys, tmp_path):
    """The 16-bit greyscale PNG that came out 99.2 % white is read as the mid-grey it is."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(path)
    assert abs(float(load_image(path).mean()) - 0.5) < 1e-3
    code, out, _ = _run(capsys, "attack", "--preset", "idlg", "--steps", "1", "--image", path, "--json")
    assert code == 0 and json.loads(out)["image"].startswith("grey16.png")
