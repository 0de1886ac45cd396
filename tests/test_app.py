"""AppTest for every page of the Streamlit app (the real code paths, background threads included)."""

from __future__ import annotations

import io
import json
import math
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import wait_for_app
from PIL import Image
from streamlit.testing.v1 import AppTest

from lavp_core import jobs
from lavp_core.data import load_dataset
from lavp_core.metrics import to_uint8_image
from lavp_core.store import open_store
from lavp_core.study import canonical_json, load_results, sha256_text

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
PAGES = ("guide", "attack", "proxies", "study", "rankings")
TITLES = {"guide": "LAVP Explorer", "attack": "Attack", "proxies": "Proxies", "study": "Study",
          "rankings": "Rankings"}
BUNDLED = ROOT / "assets" / "study" / "photos-trained.sqlite"

# A made-up study of six images on lenet: the L2 attack's MSE grows with the image's position in the list
# and the cosine attack's shrinks (their rankings disagree), l2_max follows the L2 MSE and cos_min the
# cosine MSE (each loss's LAVP predicts its own ranking), grad_norm follows neither.
FAKE_IMAGES = (3, 8, 15, 22, 40, 77)
FAKE_MSE = {"l2": (0.010, 0.020, 0.030, 0.040, 0.050, 0.060), "cos": (0.060, 0.050, 0.040, 0.030, 0.020, 0.010)}
FAKE_GRAD_NORM = (5.0, 1.0, 4.0, 2.0, 6.0, 3.0)


def _png(image01) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8_image(image01)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_study_db(path: Path, arch: str = "lenet") -> Path:
    """Write a tiny results database through the store API (rows as a study writes them)."""
    data = load_dataset("photos", "val")
    with open_store(path) as store:
        keys = []
        for k, index in enumerate(FAKE_IMAGES):
            truth, label = data[index]
            proxy_key = sha256_text(f"fake-proxies-{index}-{arch}")
            values = {"grad_norm": FAKE_GRAD_NORM[k], "l2_max": 1e4 * FAKE_MSE["l2"][k],
                      "l2_min": 1e-6 * (k + 1), "cos_max": 0.01 * (6 - k), "cos_min": 1e-3 * FAKE_MSE["cos"][k]}
            values["fusion"] = math.sqrt(values["l2_max"] * values["cos_min"])
            proxies = [{"proxy": name, "flavour": flavour, "method": "exact" if flavour == "exact" else "paper",
                        "value": value * (1.0 if flavour == "exact" else 1.01), "residual": 1e-9,
                        "converged": True, "iterations": 10, "seconds": 0.1, "note": ""}
                       for flavour in ("exact", "paper") for name, value in values.items()]
            for loss in ("l2", "cos"):
                config = {"fake": True, "index": index, "arch": arch, "loss": loss}
                key = sha256_text(canonical_json(config))
                keys.append(key)
                mse = FAKE_MSE[loss][k]
                noisy = (truth + (0.5 - truth) * min(1.0, 8 * mse)).clamp(0, 1)
                store.write_job({
                    "job_key": key, "proxy_key": proxy_key, "study": "fake", "config_json": canonical_json(config),
                    "dataset": "photos", "split": "val", "image_index": index, "arch": arch, "weights": "random",
                    "seed": 0, "loss": loss, "preset": "lavp-paper", "attack_json": json.dumps({"loss": loss}),
                    "attack_seed": 1, "status": "done", "label": label, "label_used": label,
                    "image_description": data.describe(index), "matching_loss": mse / 10, "steps": 10,
                    "mse": mse, "psnr": 10 * math.log10(1 / mse), "ssim": 1 - 5 * mse, "lpips": None,
                    "lpips_reason": "AlexNet weights are not cached", "truth_png": _png(truth),
                    "reconstruction_png": _png(noisy)}, proxies)
        store.register_study(sha256_text("fake-study"), "fake", "{}", keys)
    return path


@pytest.fixture(scope="session")
def study_db(tmp_path_factory) -> Path:
    return make_study_db(tmp_path_factory.mktemp("study") / "fake.sqlite")


@pytest.fixture(autouse=True)
def no_leftover_jobs():
    """Let no background attack or computation of one test run on into the next."""
    yield
    jobs.stop_all(wait=180)


def app(study_db: Path | None = None, monkeypatch=None) -> AppTest:
    if monkeypatch is not None and study_db is not None:
        monkeypatch.setenv("LAVP_STUDY_DB", str(study_db))
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def frames(at: AppTest) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe]


def metrics_table(at: AppTest) -> pd.DataFrame | None:
    for frame in frames(at):
        if "score" in frame.columns and "MSE" in set(frame["score"]):
            return frame
    return None


def wait_for(at: AppTest, found, timeout: float = 180.0, what: str = "the result"):
    return wait_for_app(at, found, timeout, what)


def proxies_table(at: AppTest) -> pd.DataFrame | None:
    for frame in frames(at):
        if "proxy" in frame.columns and "meaning" in frame.columns:
            return frame
    return None



@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(page, study_db, monkeypatch):
    at = open_page(app(study_db, monkeypatch), page)
    assert not at.error, [e.value for e in at.error]
    assert at.title, f"page {page} has no title"


def test_guide_shows_both_hessians_as_latex():
    at = app()
    formulas = " ".join(e.value for e in at.latex)
    assert "H_{L2}" in formulas and "H_{\\cos}" in formulas
    assert "J(x^*)^\\top" in formulas


@pytest.mark.parametrize("page", PAGES)
def test_a_first_visit_straight_to_a_page_url_draws_it_through_the_app(page):
    """A fresh AppTest asked for pages/<page>.py before any run is a first visit to /<page> on a fresh
    server: Streamlit still follows the pages/ folder convention and runs the page file alone. The page must
    still come with app.py's sidebar and show its own title, with no error."""
    at = AppTest.from_file(APP, default_timeout=90)
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value == TITLES[page]
    assert at.sidebar.header[0].value == "Client image and model"
    assert at.sidebar.number_input(key="side.index").value == 0
    assert at.session_state["side.config"].index == 0  # the sidebar of app.py ran, before the page


def test_a_page_file_run_as_the_main_script_serves_the_whole_app():
    """`python -m streamlit run pages/attack.py`: the page runs app.py, which draws its default page at /."""
    at = AppTest.from_file(str(ROOT / "pages" / "attack.py"), default_timeout=90).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == TITLES["guide"]
    assert at.sidebar.number_input(key="side.index").value == 0
    at.switch_page("attack.py").run()  # paths are relative to the main script, here pages/
    assert not at.exception and not at.error
    assert at.title[0].value == TITLES["attack"]


def test_the_scenario_is_built_by_the_core_with_its_checks(tmp_path):
    """The app's scenario is lavp_core.scenario.build_scenario with the cached model: an uploaded image's
    label is checked against the dataset's classes, and a vanished upload is a message, not a traceback."""
    from lavp_core.errors import ConfigError, ImageError
    from lavp_core.scenario import ScenarioConfig
    from lavp_ui.sidebar import cached_model, load_scenario

    path = tmp_path / "red.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(path)
    scenario = load_scenario(ScenarioConfig(dataset="photos", image=str(path), label=3))
    assert scenario.label == 3 and scenario.description.startswith("uploaded image (label 3: ")
    assert scenario.model is cached_model("lenet", "random", 0, "photos")
    assert tuple(scenario.image.shape) == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="out of range"):
        load_scenario(ScenarioConfig(dataset="photos", image=str(path), label=10))
    path.unlink()
    with pytest.raises(ImageError, match="upload it again"):
        load_scenario(ScenarioConfig(dataset="photos", image=str(path), label=3))


def test_sidebar_choices_survive_page_switches():
    at = app()
    at.number_input(key="side.index").set_value(7)
    at.selectbox(key="side.arch").set_value("alexnet")
    at.run()
    open_page(at, "proxies")
    open_page(at, "guide")
    open_page(at, "proxies")
    assert at.number_input(key="side.index").value == 7 and at.selectbox(key="side.arch").value == "alexnet"
    config = at.session_state["side.config"]
    assert (config.index, config.arch) == (7, "alexnet")
    assert "#7" in at.caption[0].value and "alexnet" in at.caption[0].value


@pytest.fixture
def lpips_unavailable(tmp_path, monkeypatch) -> str:
    """LPIPS without its AlexNet weights (as on a machine that cannot download them); yields the reason
    lavp_core gives. The cached LPIPS model is rebuilt before and after."""
    from lavp_core import metrics

    missing = tmp_path / "hub" / "checkpoints" / metrics.ALEXNET_WEIGHTS
    monkeypatch.setattr(metrics, "alexnet_weights_path", lambda: missing)
    metrics._lpips_model.cache_clear()
    status = metrics.lpips_status()
    assert not status.available and str(missing) in status.reason
    yield status.reason
    metrics._lpips_model.cache_clear()


def test_attack_runs_in_the_background_and_shows_metrics_and_proxies(lpips_unavailable):
    at = open_page(app(), "attack")
    assert at.selectbox(key="attack.preset").value == "lavp-paper"
    at.number_input(key="attack.steps").set_value(20)
    at.number_input(key="attack.restarts").set_value(1)
    at.radio(key="attack.loss").set_value("l2")
    at.button(key="btn.attack.run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = wait_for(at, metrics_table, what="the metrics table")
    assert list(table["score"]) == ["MSE", "PSNR (dB)", "SSIM", "LPIPS"]
    outcome = at.session_state["attack.record"].job.view().outcome
    assert outcome.steps == 20 and outcome.preset == "lavp-paper" and not outcome.cancelled
    assert float(table.loc[table["score"] == "MSE", "value"].iloc[0]) > 0
    lpips = table[table["score"] == "LPIPS"].iloc[0]
    assert lpips["value"] == "unavailable" and lpips["note"] == lpips_unavailable  # the reason, word for word
    assert "fetch-lpips" in lpips["note"]
    captions = [c for image in at.main.image for c in (image.proto.imgs[0].caption,)]
    assert "ground truth" in captions and any(c.startswith("reconstruction (done") for c in captions), captions
    proxies = wait_for(at, proxies_table, what="the proxies table")
    assert {"grad_norm", "l2_max", "l2_min", "cos_max", "cos_min", "fusion"} <= set(proxies["proxy"])
    assert not at.button(key="btn.attack.run").disabled


def test_stop_ends_a_long_attack_and_other_clicks_keep_its_state():
    at = open_page(app(), "attack")
    at.number_input(key="attack.steps").set_value(5000)
    at.button(key="btn.attack.run").click().run()
    record = at.session_state["attack.record"]
    assert at.button(key="btn.attack.stop").disabled is False
    at.number_input(key="side.index").set_value(3).run()  # another click: the run goes on
    assert at.session_state["attack.record"] is record
    assert any("Showing the last run" in c.value for c in at.caption)
    at.button(key="btn.attack.stop").click().run()
    assert record.job.wait(60), "Stop did not end the attack"
    at.run()
    view = record.job.view()
    assert view.state == "cancelled" and view.outcome.cancelled and view.outcome.steps < 5000
    facts = next(f for f in frames(at) if "" in f.columns and "stopped early" in set(f[""]))
    assert facts.loc[facts[""] == "stopped early", "value"].iloc[0] == "yes"


def test_run_uses_the_settings_changed_just_before_the_click():
    at = open_page(app(), "attack")
    at.selectbox(key="attack.preset").set_value("dlg").run()
    assert at.number_input(key="attack.steps").value == 10  # the preset's demo settings
    at.number_input(key="attack.steps").set_value(2)
    at.button(key="btn.attack.run").click().run()  # one round trip: the new value and the click together
    record = at.session_state["attack.record"]
    assert record.job.wait(120)
    assert record.request.steps == 2 and record.job.view().outcome.steps == 2


def test_a_valid_upload_becomes_the_client_image():
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buffer, format="PNG")
    at = app()
    at.selectbox(key="side.dataset").set_value("upload an image").run()
    at.file_uploader(key="side.upload").upload("red.png", buffer.getvalue(), "image/png").run()
    assert not at.error and not at.exception
    config = at.session_state["side.config"]
    assert config.image is not None and config.label == 0
    open_page(at, "proxies")
    assert "uploaded image" in at.caption[0].value


def test_two_sessions_do_not_share_attack_state():
    first, second = open_page(app(), "attack"), open_page(app(), "attack")
    first.number_input(key="attack.steps").set_value(5000)
    first.button(key="btn.attack.run").click().run()
    second.run()
    assert "attack.record" not in second.session_state
    assert any("press **Run**" in i.value for i in second.info)
    first.button(key="btn.attack.stop").click().run()


def test_rconv_on_an_unsupported_architecture_is_an_error_box_not_a_traceback():
    at = app()
    at.selectbox(key="side.arch").set_value("alexnet").run()
    open_page(at, "attack")
    at.selectbox(key="attack.preset").set_value("rconv").run()
    assert at.number_input(key="attack.steps").disabled  # R-CONV has no settings
    at.button(key="btn.attack.run").click().run()
    assert not at.exception
    assert at.error and "pooling" in at.error[0].value and "cnn-rconv" in at.error[0].value
    assert "attack.record" not in at.session_state


def test_rconv_on_its_architecture_reconstructs_the_image_layer_by_layer():
    """R-CONV has no settings of its own (its preset's defaults are all None): the page runs it as it is."""
    at = app()
    at.selectbox(key="side.arch").set_value("cnn-rconv").run()
    open_page(at, "attack")
    at.selectbox(key="attack.preset").set_value("rconv").run()
    at.button(key="btn.attack.run").click().run()
    assert not at.error, [e.value for e in at.error]
    record = at.session_state["attack.record"]
    assert record.job.wait(120) and record.job.view().state == "done"
    table = wait_for(at, metrics_table, what="the metrics table")
    assert float(table.loc[table["score"] == "MSE", "value"].iloc[0]) < 1e-6  # an exact inversion
    assert any(m.value.startswith("**R-CONV, layer by layer**") for m in at.markdown)


def test_unreadable_upload_is_an_error_box():
    at = app()
    at.selectbox(key="side.dataset").set_value("upload an image").run()
    at.file_uploader(key="side.upload").upload("photo.png", b"this is not an image", "image/png").run()
    assert not at.exception
    assert at.error and "not a readable image" in at.error[0].value


def test_study_page_plots_and_tabulates_the_database(study_db, monkeypatch):
    at = open_page(app(study_db, monkeypatch), "study")
    charts = at.get("plotly_chart")
    assert charts, "no scatter plot"
    figure = json.loads(charts[0].proto.spec)
    titles = [a["text"] for a in figure["layout"]["annotations"]]
    assert len(titles) == 2 and all("σ_S" in t for t in titles)  # the L2 and the cosine panel of one proxy
    assert figure["layout"]["xaxis"]["type"] == "log" and figure["layout"]["yaxis"]["type"] == "log"
    assert at.selectbox(key="study.proxy").value == "l2_max"
    assert titles[0].startswith("L2 attack: σ_S = +1.00")  # l2_max follows the L2 MSE exactly
    table = next(f for f in frames(at) if f.index.name == "σ_S")
    assert {"photos+L2", "photos+CS"} <= set(table.index)
    assert {"grad_norm", "l2_max", "cos_min"} <= set(table.columns)
    assert len(at.get("download_button")) == 2
    at.radio(key="study.flavour").set_value("paper").run()
    assert not at.exception and at.get("plotly_chart")


def test_study_and_rankings_pages_read_the_bundled_study(monkeypatch):
    from lavp_ui.study_access import bundled_studies

    assert BUNDLED.is_file(), "the bundled study database is missing from assets/study"
    monkeypatch.delenv("LAVP_STUDY_DB", raising=False)
    at = open_page(app(), "study")
    assert not at.error, [e.value for e in at.error]
    with open_store(bundled_studies()[0], readonly=True) as store:  # the study the page opens first
        partial = any(s["done"] < s["jobs"] for s in store.studies())
    assert partial == any("Partial study" in w.value for w in at.warning)
    assert at.get("plotly_chart") and any(f.index.name == "σ_S" for f in frames(at))
    open_page(at, "rankings")
    assert not at.error, [e.value for e in at.error]
    assert len([m for m in at.markdown if m.value.startswith("####")]) == 2


def test_an_unfinished_study_is_announced_as_partial(study_db, tmp_path, monkeypatch):
    import shutil

    partial = tmp_path / "partial.sqlite"
    shutil.copy(study_db, partial)
    with open_store(partial) as store:
        done_keys = [r["job_key"] for r in store.job_rows()]
        store.register_study(sha256_text("fake-study-bigger"), "bigger", "{}",
                             done_keys + [sha256_text(f"not-run-{i}") for i in range(3)])
    at = open_page(app(partial, monkeypatch), "study")
    notes = [w.value for w in at.warning if "Partial study" in w.value]
    assert len(notes) == 1 and f"{len(done_keys)} of {len(done_keys) + 3} jobs of study 'bigger'" in notes[0]
    assert at.get("plotly_chart"), "a partial study still plots its finished jobs"
    open_page(at, "rankings")
    assert any("Partial study" in w.value for w in at.warning)
    at = open_page(app(study_db, monkeypatch), "study")
    assert not any("Partial study" in w.value for w in at.warning)  # the finished one says nothing


def test_study_page_without_a_database_says_how_to_make_one(tmp_path, monkeypatch):
    at = open_page(app(tmp_path / "missing.sqlite", monkeypatch), "study")
    assert not at.error
    assert any("python -m lavp_core study" in i.value for i in at.info)


def test_study_page_refuses_a_file_that_is_not_a_database(tmp_path, monkeypatch):
    """An uploaded file that is not a database is an error box, which never quotes the file."""
    at = open_page(app(), "study")
    at.radio(key="study.source").set_value("upload").run()
    at.file_uploader(key="up.study.db").upload("notes.sqlite", b"root:x:0:0:root:/root:/bin/bash\n" * 50,
                                               "application/octet-stream").run()
    assert not at.exception
    assert at.error and "not an SQLite database" in at.error[0].value and "root:x" not in at.error[0].value


def test_databases_come_only_from_bundled_studies_the_results_folder_or_uploads(study_db, tmp_path, monkeypatch):
    """No page takes a path typed in the browser (it read any server file): the choices are the bundled
    studies, the .sqlite files of $LAVP_RESULTS_DIR (no link out of it), or an upload."""
    import shutil

    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(study_db, folder / "class-study.sqlite")
    (folder / "notes.txt").write_text("not offered")
    (folder / "outside.sqlite").symlink_to(study_db)  # a link leading out of the folder: not offered
    for page in ("study", "rankings"):
        monkeypatch.delenv("LAVP_RESULTS_DIR", raising=False)
        at = open_page(app(study_db, monkeypatch), page)
        assert not at.text_input, "a path box is back"
        assert at.radio(key=f"{page}.source").options == ["a bundled study", "upload a database"]
        monkeypatch.setenv("LAVP_RESULTS_DIR", str(folder))
        at = open_page(app(study_db, monkeypatch), page)
        assert at.radio(key=f"{page}.source").options == ["a bundled study", "the server's results folder",
                                                          "upload a database"]
        at.radio(key=f"{page}.source").set_value("server").run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert at.selectbox(key=f"{page}.server").options == ["class-study.sqlite"]
    at = open_page(app(study_db, monkeypatch), "study")
    at.radio(key="study.source").set_value("server").run()
    assert at.get("plotly_chart"), "the results folder's database was not read"


def test_rankings_page_shows_both_rankings_and_their_predictors(study_db, monkeypatch):
    at = open_page(app(study_db, monkeypatch), "rankings")
    assert not at.error, [e.value for e in at.error]
    headers = [m.value for m in at.markdown if m.value.startswith("####")]
    assert len(headers) == 2 and "L2 attack" in headers[0] and "Cosine attack" in headers[1]
    l2_ranking, cos_ranking = (h.split(": ", 1)[1] for h in headers)
    assert l2_ranking == " > ".join(reversed(cos_ranking.split(" > ")))  # the made-up losses disagree fully
    table = next(f for f in frames(at) if "predicted ranking" in f.columns)
    row = table.set_index("proxy")
    assert row.loc["l2_max", "matches L2"] == "✓" and row.loc["cos_min", "matches cosine"] == "✓"
    assert row.loc["grad_norm", "matches L2"] == "" and row.loc["grad_norm", "matches cosine"] == ""


def test_rankings_without_a_database_run_new_attacks_through_the_study_pipeline(tmp_path, monkeypatch):
    from lavp_ui.study_access import scratch_db

    at = open_page(app(tmp_path / "missing.sqlite", monkeypatch), "rankings")
    assert at.radio(key="rankings.mode").value == "new attacks" and len(at.radio(key="rankings.mode").options) == 1
    at.multiselect(key="rankings.new_images").set_value([0, 1]).run()
    assert at.radio(key="rankings.budget").value == "reconstructs"  # the default budget recovers images
    at.radio(key="rankings.budget").set_value("quick").run()  # 300 steps: enough to test the pipeline
    at.button(key="btn.rankings.run").click().run()

    def headers(at):
        return [m.value for m in at.markdown if m.value.startswith("####")] or None

    found = wait_for(at, headers, what="the two rankings")
    assert "L2 attack" in found[0] and "Cosine attack" in found[1]
    assert not at.error
    table = next(f for f in frames(at) if "predicted ranking" in f.columns)
    assert {"grad_norm", "l2_max", "cos_min", "fusion"} <= set(table["proxy"])
    stored = load_results(scratch_db())  # in the process's private folder
    assert len(stored) == 4 and set(stored["loss"]) == {"l2", "cos"}  # 2 images x 2 losses, kept for reuse


# ---- one server, many sessions: bounded work, safe uploads ------------------------------------------------


def _bomb_png(width: int, height: int) -> bytes:
    """A greyscale PNG header declaring ``width`` x ``height`` with one row of data: a size check reads the
    header; only a decoder would try to allocate the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
            + chunk(b"IEND", b""))


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.selectbox(key="side.dataset").set_value("upload an image").run()
    at.file_uploader(key="side.upload").upload(name, data, "image/png").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.parametrize("side", [13_000, 20_000, 100_000])
def test_a_decompression_bomb_upload_is_an_error_box(side):
    at = upload(app(), "bomb.png", _bomb_png(side, side))
    assert at.error and "megapixels" in at.error[0].value and "decompression bomb" in at.error[0].value
    assert at.session_state["side.config"] is None


def test_an_image_over_the_app_limit_is_refused_and_the_command_line_keeps_its_range():
    from lavp_core.data import MAX_IMAGE_PIXELS
    from lavp_ui.serving import limits

    allowed = limits().max_image_pixels
    assert allowed < 20_000_000 < MAX_IMAGE_PIXELS
    at = upload(app(), "panorama.png", _bomb_png(5_000, 4_000))  # 20 MP: fine for the CLI, not for the app
    assert at.error and f"at most {allowed / 1e6:g} megapixels" in at.error[0].value


def test_an_upload_is_decoded_once_per_file(monkeypatch):
    from lavp_ui import sidebar

    calls = []
    real = sidebar.load_image
    monkeypatch.setattr(sidebar, "load_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    sidebar.upload_preview.clear()
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (20, 90, 200)).save(buffer, format="PNG")
    at = upload(app(), "blue.png", buffer.getvalue())
    for index in (1, 2, 3):  # other widgets change: every run used to decode the upload again
        at.selectbox(key="side.upload_label").set_value(index).run()
    open_page(at, "proxies")
    assert not at.error and calls == [1]
    upload(app(), "same-picture.png", buffer.getvalue())  # the same content from another session
    assert calls == [1]  # the preview is cached by the content's SHA-256
    from lavp_ui.sidebar import _upload_scenario

    config = at.session_state["side.config"]
    assert config.label == 3 and _upload_scenario(config) is _upload_scenario(config)  # built once


def test_two_sessions_uploads_never_share_a_file():
    """The same bytes uploaded by two sessions go to two files, each written by this process into its
    private folder (mode 0700) under a name nobody can predict."""
    import stat

    from lavp_ui.files import private_dir, read_private

    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buffer, format="PNG")
    first, second = upload(app(), "red.png", buffer.getvalue()), upload(app(), "red.png", buffer.getvalue())
    a, b = (Path(at.session_state["side.config"].image) for at in (first, second))
    assert a != b and a.parent == b.parent == private_dir()
    assert stat.S_IMODE(private_dir().stat().st_mode) == 0o700
    assert read_private(a) == read_private(b) == buffer.getvalue()
    assert "red" not in a.name
    first.run()
    assert Path(first.session_state["side.config"].image) == a  # the same file on the next run


def test_a_file_changed_behind_the_server_is_not_trusted():
    from lavp_core.errors import ImageError
    from lavp_ui.files import read_private, save_private

    path = save_private(b"first content", "x.png", "someone")
    path.write_bytes(b"planted content")
    with pytest.raises(ImageError, match="changed on the server"):
        read_private(path)
    with pytest.raises(ImageError, match="not one this server wrote"):
        read_private(path.with_name("elsewhere.png"))


def test_a_planted_file_or_link_is_never_written_through(tmp_path, monkeypatch):
    """A file or a symlink already at the name an upload would take is skipped (exclusive creation without
    following links), and what it points to is left as it was."""
    from lavp_ui import files
    from lavp_ui.study_access import scratch_db

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    names = iter(["planted", "another", "fresh"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    (files.private_dir() / "planted.png").symlink_to(target)
    (files.private_dir() / "another.png").write_bytes(b"not ours")
    path = files.save_private(b"the upload", "me.png", "owner-x")
    assert path.name == "fresh.png" and path.read_bytes() == b"the upload"
    assert target.read_text() == "keep me" and (files.private_dir() / "another.png").read_bytes() == b"not ours"
    assert not files.is_private(files.private_dir() / "another.png")
    assert scratch_db().parent == files.private_dir()
    assert files.remove_owner_files("owner-x") == 1 and not path.exists()


def test_a_closed_session_leaves_no_running_attack(monkeypatch):
    """Reload the page three times while an attack runs: each reload is a new session, and the old one's
    attack, which no Stop button can reach any more, is stopped within seconds by the job board's watchdog
    (Streamlit's runtime says the old session is gone; AppTest has no runtime, so the board is told here)."""
    from lavp_ui.serving import job_board

    board = job_board()
    gone: set[str] = set()
    monkeypatch.setattr(board, "alive", lambda token: token not in gone)
    orphans = []
    for _ in range(3):
        at = open_page(app(), "attack")
        at.number_input(key="attack.steps").set_value(5000)
        at.button(key="btn.attack.run").click().run()
        assert not at.error, [e.value for e in at.error]
        record = at.session_state["attack.record"]
        assert not record.job.finished
        orphans.append(record.job)
        gone.add(at.session_state["serve.session"])  # the page is reloaded: this session has ended
    for job in orphans:
        assert job.wait(board.grace + 10 * board.interval + 5), "an orphaned attack kept running"
        assert job.view().state == "cancelled"
    alive = open_page(app(), "attack")  # a session that is still there keeps its attack
    alive.number_input(key="attack.steps").set_value(5000)
    alive.button(key="btn.attack.run").click().run()
    record = alive.session_state["attack.record"]
    time.sleep(board.grace + 2 * board.interval)
    assert not record.job.finished
    alive.button(key="btn.attack.stop").click().run()
    assert record.job.wait(60)


def test_the_attack_page_bounds_the_work_and_shows_a_place_in_line(monkeypatch):
    from lavp_core.jobs import BackgroundTask
    from lavp_ui.serving import job_board, limits

    allowed = limits()
    at = open_page(app(), "attack")
    assert at.number_input(key="attack.steps").max == allowed.max_steps
    assert at.number_input(key="attack.restarts").max == allowed.max_restarts
    at.number_input(key="attack.steps").set_value(allowed.max_steps)
    at.number_input(key="attack.restarts").set_value(allowed.max_restarts)
    at.button(key="btn.attack.run").click().run()
    assert at.error and "command line" in at.error[0].value and "attack.record" not in at.session_state

    board = job_board()
    release = threading.Event()
    holders = [BackgroundTask(lambda control: release.wait(120), slots=board.slots).start()
               for _ in range(board.slots.slots)]  # every slot busy with someone else's work
    deadline = time.monotonic() + 60
    while board.load()[0] < board.slots.slots and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        at.number_input(key="attack.steps").set_value(20)
        at.number_input(key="attack.restarts").set_value(1)
        at.button(key="btn.attack.run").click().run()
        record = at.session_state["attack.record"]
        assert record.job.view().queue_position == 1
        assert any("next in line" in i.value for i in at.info), [i.value for i in at.info]
        assert any(c.value.startswith("Server: ") and "1 waiting" in c.value for c in at.caption)
    finally:
        release.set()
    assert all(h.wait(30) for h in holders)
    assert record.job.wait(120) and record.job.view().state == "done"


def test_a_damaged_database_is_an_error_box_on_the_study_page(study_db, tmp_path, monkeypatch):
    import shutil
    import sqlite3

    damaged = tmp_path / "damaged.sqlite"
    shutil.copy(study_db, damaged)
    conn = sqlite3.connect(damaged)
    page_size, pages = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count"))
    last_root = max(r[0] for r in conn.execute("SELECT rootpage FROM sqlite_master"))
    conn.close()
    data = bytearray(damaged.read_bytes())
    for page in range(last_root, pages):
        data[page * page_size + 8:page * page_size + 8 + page_size // 2] = b"\x5a" * (page_size // 2)
    damaged.write_bytes(bytes(data))
    for page in ("study", "rankings"):
        at = open_page(app(damaged, monkeypatch), page)
        assert not at.exception, [e.value for e in at.exception]
        assert at.error and "malformed" in at.error[0].value, [e.value for e in at.error]
