"""AppTest for the Study and Rankings pages: which study opens first, what the pages say about the data
(sign- and significance-aware, the paper's claims labelled), the failed-attack notice, the partial-study
notice, readable log axes and the training-snapshot view. Fixture databases are written with the store API,
as a study writes them."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from lavp_core import jobs
from lavp_core.data import load_dataset
from lavp_core.metrics import to_uint8_image
from lavp_core.store import open_store
from lavp_core.study import canonical_json, sha256_text

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
IMAGES = (3, 8, 15, 22, 40, 77, 90, 101)
SIDEBAR_NOTE = "does not use the sidebar's image or model"


def _png(image01) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8_image(image01)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_db(path: Path, *, name: str = "fixture", sign: float = 1.0, ssim: float | dict | None = None,
            weights: tuple[str, ...] = ("random",), unfinished: int = 0, cos_reversed: bool = False,
            images: tuple[int, ...] = IMAGES) -> Path:
    """A small study of lenet jobs on ``IMAGES`` with both losses. Each loss's MSE grows with the image's
    position; each loss's LAVP (l2_max, cos_min) grows with it when ``sign`` > 0 and shrinks when < 0;
    grad_norm is unrelated; ``cos_reversed`` makes the cosine MSE shrink instead (the rankings disagree).
    ``ssim``: every job's SSIM, or one per image index (default 1 − 5·MSE, all recovered). ``weights``: one
    set of jobs per model state, the proxies scaled with the epoch of ``trained@E``. ``unfinished`` more jobs
    are registered but never run (a partial study)."""
    data = load_dataset("photos", "val")
    grad_norm = (5.0, 1.0, 4.0, 2.0, 6.0, 3.0, 8.0, 7.0)
    with open_store(path) as store:
        keys = []
        for state in weights:
            epoch = int(state.partition("@")[2] or 0)
            for k, index in enumerate(images):
                truth, label = data[index]
                rank = k + 1 if sign > 0 else len(IMAGES) - k
                values = {"grad_norm": grad_norm[k] * (1 + epoch), "l2_max": 10.0 ** (rank / 2) * (1 + epoch),
                          "l2_min": 1e-9 * rank, "cos_max": 0.5 + 0.01 * grad_norm[k],
                          "cos_min": 1e-4 * 10.0 ** (rank / 3) / (1 + epoch)}
                values["fusion"] = math.sqrt(values["l2_max"] * values["cos_min"])
                proxies = [{"proxy": p, "flavour": flavour, "method": "exact" if flavour == "exact" else "paper",
                            "value": v * (1.0 if flavour == "exact" else 1.01), "residual": 1e-9, "converged": True,
                            "iterations": 10, "seconds": 0.1, "note": ""}
                           for flavour in ("exact", "paper") for p, v in values.items()]
                proxy_key = sha256_text(f"{name}-proxies-{index}-{state}")
                for loss in ("l2", "cos"):
                    config = {"fixture": name, "index": index, "loss": loss, "weights": state}
                    key = sha256_text(canonical_json(config))
                    keys.append(key)
                    position = len(images) - k if loss == "cos" and cos_reversed else k + 1
                    mse = 0.005 * position * (1 + epoch / 10)
                    score = (1 - 5 * mse if ssim is None else ssim[index] if isinstance(ssim, dict) else ssim)
                    store.write_job({
                        "job_key": key, "proxy_key": proxy_key, "study": name, "config_json": canonical_json(config),
                        "dataset": "photos", "split": "val", "image_index": index, "arch": "lenet",
                        "weights": state, "seed": 0, "loss": loss, "preset": "lavp-paper",
                        "attack_json": json.dumps({"loss": loss}), "attack_seed": 1, "status": "done",
                        "label": label, "label_used": label, "image_description": data.describe(index),
                        "matching_loss": mse / 10, "steps": 10, "mse": mse, "psnr": 10 * math.log10(1 / mse),
                        "ssim": score, "lpips": None, "lpips_reason": "AlexNet weights are not cached",
                        "truth_png": _png(truth), "reconstruction_png": _png(truth)}, proxies)
        extra = [sha256_text(f"{name}-not-run-{i}") for i in range(unfinished)]
        store.register_study(sha256_text(f"{name}-study"), name, "{}", keys + extra)
    return path


@pytest.fixture(autouse=True)
def no_leftover_jobs():
    yield
    jobs.stop_all(wait=180)


def open_page(page: str, db: Path | None, monkeypatch) -> AppTest:
    if db is None:
        monkeypatch.delenv("LAVP_STUDY_DB", raising=False)
    else:
        monkeypatch.setenv("LAVP_STUDY_DB", str(db))
    monkeypatch.delenv("LAVP_RESULTS_DIR", raising=False)
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown] + [c.value for c in at.caption]


def figures(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def scatter(at: AppTest) -> dict:
    return next(f for f in figures(at) if any("attack: σ_S" in a["text"] for a in f["layout"].get("annotations", [])))


def log_axes(figure: dict) -> list[dict]:
    return [v for k, v in figure["layout"].items() if "axis" in k and v.get("type") == "log"]


def test_negative_correlations_are_reported_as_not_tracking_the_error(tmp_path, monkeypatch):
    db = make_db(tmp_path / "negative.sqlite", sign=-1.0)
    at = open_page("study", db, monkeypatch)
    assert not at.error, [e.value for e in at.error]
    said = texts(at)
    verdicts = [t for t in said if "does not track the reconstruction error in the paper's sense" in t]
    assert len(verdicts) == 2 and any("L2 attack" in t for t in verdicts) and any("cosine attack" in t
                                                                                  for t in verdicts)
    assert not any("beats" in t for t in said), [t for t in said if "beats" in t]
    assert any(t.startswith("The paper claims:") for t in said)
    # the panels' own sentences follow the sign: l2_max falls as the L2 MSE grows
    assert any("a larger l2_max comes with a better reconstruction" in t and "against the paper's claim" in t
               for t in said)
    assert not any("larger values predict a worse reconstruction" in t.lower() for t in said)
    titles = [a["text"] for a in scatter(at)["layout"]["annotations"]]
    assert titles[0].startswith("L2 attack: σ_S = -1.00") and "[" in titles[0]  # with its interval
    assert not [w for w in at.warning if "describe the images' own statistics" in w.value]  # they leaked


def test_positive_correlations_beat_the_gradient_norm_with_their_interval(tmp_path, monkeypatch):
    at = open_page("study", make_db(tmp_path / "positive.sqlite"), monkeypatch)
    beats = [t for t in texts(at) if "beats the gradient norm in the paper's sense" in t]
    assert beats and all("interval" in t for t in beats)


def test_failed_attacks_carry_the_regime_warning(tmp_path, monkeypatch):
    db = make_db(tmp_path / "failed.sqlite", ssim=0.05)
    at = open_page("study", db, monkeypatch)
    notices = [w.value for w in at.warning if "describe the images' own statistics" in w.value]
    assert notices and any("L2 attack" in n for n in notices) and any("cosine attack" in n for n in notices)
    at = open_page("rankings", db, monkeypatch)
    assert any("describe the images' own statistics" in w.value for w in at.warning)


def test_a_partial_study_says_how_many_jobs_are_done(tmp_path, monkeypatch):
    db = make_db(tmp_path / "partial.sqlite", name="growing", unfinished=5)
    at = open_page("study", db, monkeypatch)
    notes = [w.value for w in at.warning if "Partial study" in w.value]
    done = 2 * len(IMAGES)
    assert len(notes) == 1 and f"{done} of {done + 5} jobs of study 'growing'" in notes[0]
    assert at.get("plotly_chart")


def test_the_study_picker_defaults_to_the_random_weight_study(monkeypatch):
    from lavp_ui.study_access import BUNDLED_LABELS, STUDY_DIR

    present = [name for name in BUNDLED_LABELS if (STUDY_DIR / name).is_file()]
    if len(present) < 2:
        pytest.skip("fewer than two bundled studies in assets/study")
    at = open_page("study", None, monkeypatch)
    picker = at.selectbox(key="study.bundled")
    assert picker.value == present[0] and picker.options[:len(present)] == [BUNDLED_LABELS[n] for n in present]
    if present[0] == "photos-random.sqlite":
        assert any("model state: lenet with random initial weights" in t for t in texts(at))


def test_log_axes_are_labelled_by_powers_of_ten_and_ssim_is_linear(tmp_path, monkeypatch):
    at = open_page("study", make_db(tmp_path / "axes.sqlite"), monkeypatch)
    figure = scatter(at)
    axes = log_axes(figure)
    assert len(axes) == 4  # x and y of both panels (MSE)
    for axis in axes:
        assert axis["exponentformat"] == "power"
        assert all(t == "1" or t.startswith("10") for t in axis["ticktext"]), axis["ticktext"]
        assert all(math.log10(v) == round(math.log10(v)) for v in axis["tickvals"])
    assert len(figure["data"]) == 4  # two scatters and their trend lines
    at.selectbox(key="study.score").set_value("ssim").run()
    figure = scatter(at)
    assert figure["layout"]["yaxis"]["type"] == "linear" and figure["layout"]["xaxis"]["type"] == "log"
    assert figure["layout"]["xaxis"]["exponentformat"] == "power"


def test_the_loss_curve_axis_has_no_bare_mantissas():
    from lavp_ui.formatting import loss_curve, power_label

    figure = loss_curve([(0, 3.0), (10, 0.2), (20, 4e-4)]).to_plotly_json()
    axis = figure["layout"]["yaxis"]
    assert axis["type"] == "log" and axis["exponentformat"] == "power"
    assert axis["ticktext"] == ["10⁻⁴", "10⁻³", "10⁻²", "10⁻¹", "1", "10"]
    assert power_label(-12) == "10⁻¹²"


def test_the_training_study_is_plotted_against_epoch(tmp_path, monkeypatch):
    db = make_db(tmp_path / "training.sqlite", weights=("trained@0", "trained@5", "trained@40"))
    at = open_page("study", db, monkeypatch)
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="study.weights").options == ["trained@0", "trained@5", "trained@40"]
    assert any("training snapshots after 0, 5, 40 epochs" in t for t in texts(at))
    training = [f for f in figures(at) if f["layout"].get("xaxis", {}).get("title", {}).get("text") == "epoch"]
    assert len(training) == 1
    figure = training[0]
    assert figure["layout"]["xaxis"]["tickvals"] == [0, 5, 40]
    titles = [a["text"] for a in figure["layout"]["annotations"]]
    assert {"grad_norm", "l2_max", "cos_min"} <= set(titles) and "MSE (↓)" in titles
    grad_norm = figure["data"][0]
    assert grad_norm["x"] == [0, 5, 40] and grad_norm["y"][0] < grad_norm["y"][1] < grad_norm["y"][2]
    at.selectbox(key="study.weights").set_value("trained@40").run()
    assert not at.exception and scatter(at)


@pytest.mark.parametrize("page", ["study", "rankings"])
def test_page_controls_never_share_a_label_with_the_sidebar(page, tmp_path, monkeypatch):
    at = open_page(page, make_db(tmp_path / "labels.sqlite", weights=("trained@0", "trained@5")), monkeypatch)
    side = {w.label for kind in ("selectbox", "radio", "number_input") for w in getattr(at.sidebar, kind)}
    main = {w.label for kind in ("selectbox", "radio", "multiselect") for w in getattr(at.main, kind)}
    assert side and main and not side & main, side & main
    assert any(SIDEBAR_NOTE in t for t in [i.value for i in at.info] + texts(at))


def test_rankings_default_mixes_recovered_images_with_disagreeing_rankings(tmp_path, monkeypatch):
    recovered = {90: 0.8, 101: 0.8}  # only the last two images are recovered (SSIM ≥ 0.5)
    ssim = {i: recovered.get(i, 0.1) for i in IMAGES}
    db = make_db(tmp_path / "mixed.sqlite", ssim=ssim, cos_reversed=True)
    at = open_page("rankings", db, monkeypatch)
    assert not at.error, [e.value for e in at.error]
    chosen = at.multiselect(key="rankings.images.lenet.random.exact").value
    assert len(chosen) == 4
    assert set(chosen) & set(recovered) and set(chosen) - set(recovered)  # recognisable and not, side by side
    said = texts(at)
    assert any(t.startswith("The paper claims:") for t in said)
    assert any("rank these 4 images differently" in t for t in said)
    assert any(t.startswith("Recovered among these images") for t in said)
    headers = [m.value for m in at.markdown if m.value.startswith("####")]
    assert len(headers) == 2 and "L2 attack" in headers[0] and "Cosine attack" in headers[1]
    table = next(d.value for d in at.dataframe if "predicted ranking" in d.value.columns)
    assert "matches cosine" in table.columns and "matches CS" not in table.columns


def test_rankings_with_too_few_images_say_so(tmp_path, monkeypatch):
    db = make_db(tmp_path / "few.sqlite", images=IMAGES[:3])
    at = open_page("rankings", db, monkeypatch)
    assert any("only 3 images attacked with both losses" in i.value for i in at.info)
    assert len([m for m in at.markdown if m.value.startswith("####")]) == 2
