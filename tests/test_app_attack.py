"""The Attack page's compare mode, default run and the Guide's demos (AppTest), and the L2-against-cosine
verdict of :mod:`lavp_core.compare` on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lavp_core.compare import compare_losses, percentile_rank, reference_lavp

# --------------------------------------------------------------------------------------------
# lavp_core.compare


def test_percentile_rank_counts_values_below_and_half_the_ties():
    assert percentile_rank(5.0, [1, 2, 3, 4]) == 100.0
    assert percentile_rank(0.0, [1, 2, 3, 4]) == 0.0
    assert percentile_rank(2.0, [1, 2, 3, 4]) == pytest.approx(37.5)  # 1 below, 1 tie of 4
    assert math.isnan(percentile_rank(1.0, []))
    assert math.isnan(percentile_rank(float("nan"), [1.0]))


def test_expected_is_the_loss_whose_own_lavp_sits_lower_and_leaked_the_higher_ssim():
    reference = {"l2": [100.0, 200.0, 300.0, 400.0], "cos": [0.01, 0.02, 0.03, 0.04]}
    # l2_max 350 is above 3 of 4 (75th percentile); cos_max 0.015 above 1 of 4 (25th): cosine expected
    verdict = compare_losses({"l2": 0.21, "cos": 0.90}, {"l2": 350.0, "cos": 0.015}, reference, model="lenet")
    assert verdict.percentiles == {"l2": 75.0, "cos": 25.0}
    assert verdict.expected == "cos" and verdict.leaked == "cos"
    assert "75th percentile" in verdict.sentence and "25th percentile" in verdict.sentence
    assert "The paper's claim" in verdict.sentence or "the paper's claim" in verdict.sentence
    assert "expects the cosine attack to leak more" in verdict.sentence
    assert "the cosine attack leaked more (SSIM 0.90 against 0.21 with L2), as expected" in verdict.sentence

    against = compare_losses({"l2": 0.6, "cos": 0.3}, {"l2": 350.0, "cos": 0.015}, reference, model="lenet")
    assert against.expected == "cos" and against.leaked == "l2"
    assert "the L2 attack leaked more (SSIM 0.60 against 0.30 with cosine), against that expectation" \
        in against.sentence

    l2_lower = compare_losses({"l2": 0.6, "cos": 0.3}, {"l2": 50.0, "cos": 0.035}, reference, model="lenet")
    assert l2_lower.expected == "l2" and "expects the L2 attack to leak more" in l2_lower.sentence
    assert "as expected" in l2_lower.sentence


def test_without_a_reference_the_expectation_is_not_stated_but_the_leak_is():
    verdict = compare_losses({"l2": 0.5, "cos": 0.2}, {"l2": 10.0, "cos": 0.1}, None, model="resnet8, trained weights")
    assert verdict.expected is None and verdict.leaked == "l2" and verdict.percentiles == {}
    assert "No reference study matches resnet8, trained weights" in verdict.sentence
    assert "cannot be stated for this model" in verdict.sentence
    assert "the L2 attack leaked more (SSIM 0.50 against 0.20 with cosine)" in verdict.sentence
    empty = compare_losses({"l2": 0.5, "cos": 0.5}, {"l2": 10.0, "cos": 0.1}, {"l2": [], "cos": []}, model="m")
    assert empty.leaked is None and "same SSIM" in empty.sentence


def test_reference_lavp_keeps_one_value_per_image_of_the_same_model():
    import pandas as pd

    rows = []
    for index, (l2, cos) in enumerate([(1.0, 0.1), (2.0, 0.2)]):
        for loss in ("l2", "cos"):  # a study stores each image twice (one job per loss), same proxies
            rows.append({"dataset": "photos", "split": "val", "image_index": index, "arch": "lenet",
                         "weights": "random", "seed": 0, "loss": loss, "exact_l2_max": l2, "exact_cos_max": cos})
    rows.append({"dataset": "photos", "split": "val", "image_index": 0, "arch": "resnet8", "weights": "random",
                 "seed": 0, "loss": "l2", "exact_l2_max": 99.0, "exact_cos_max": 9.0})
    df = pd.DataFrame(rows)
    got = reference_lavp(df, dataset="photos", arch="lenet", weights="random", seed=0)
    np.testing.assert_allclose(got["l2"], [1.0, 2.0])
    np.testing.assert_allclose(got["cos"], [0.1, 0.2])
    assert reference_lavp(df, dataset="photos", arch="lenet", weights="trained")["l2"].size == 0
    assert reference_lavp(df, dataset="photos", arch="lenet", weights="random", seed=1)["cos"].size == 0


# --------------------------------------------------------------------------------------------
# The Attack page (AppTest: the real code paths, background threads included)

from pathlib import Path  # noqa: E402

from conftest import wait_for_app  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from lavp_core import jobs  # noqa: E402
from lavp_ui.tasks import eta_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")


@pytest.fixture(autouse=True)
def no_leftover_jobs():
    """Let no background attack or computation of one test run on into the next."""
    yield
    jobs.stop_all(wait=180)


def app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_attack(at: AppTest) -> AppTest:
    at.switch_page("pages/attack.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at



def proxy_tables(at: AppTest) -> list[set[str]]:
    return [set(d.value["proxy"]) for d in at.dataframe if "proxy" in d.value.columns]


def progress_texts(at: AppTest) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def test_eta_is_measured_from_the_runs_own_speed():
    assert eta_text(500, 2000, 5.0) == "about 15 s left at this run's speed (100 steps/s so far)"
    assert eta_text(0, 2000, 1.0) == "" and eta_text(2000, 2000, 9.0) == ""


def test_default_settings_are_the_measured_ones_and_say_why():
    at = open_attack(app())
    assert at.selectbox(key="attack.preset").value == "lavp-paper"
    assert at.radio(key="attack.loss").value == "cos"
    assert at.number_input(key="attack.steps").value == 2000
    assert at.number_input(key="attack.restarts").value == 1
    config = at.session_state["side.config"]
    assert (config.dataset, config.index, config.arch, config.weights, config.seed) == ("photos", 0, "lenet",
                                                                                        "random", 0)
    captions = " ".join(c.value for c in at.caption)
    assert "Why this default" in captions and "budget-lenet-random.jsonl" in captions
    page_text = " ".join(e.value for e in [*at.info, *at.caption, *at.markdown])
    assert "10–25" not in page_text


def test_a_running_attack_shows_its_time_left_from_its_own_speed():
    at = open_attack(app())
    at.number_input(key="attack.steps").set_value(5000)
    at.button(key="btn.attack.run").click().run()
    text = wait_for_app(at, lambda a: next((t for t in progress_texts(a) if "s left at this run's speed" in t), None),
                    timeout=60, what="the time left")
    assert "steps/s so far" in text
    at.button(key="btn.attack.stop").click().run()
    assert at.session_state["attack.record"].job.wait(60)


def test_compare_mode_runs_both_losses_at_once_each_beside_its_own_proxies():
    at = open_attack(app())
    at.toggle(key="attack.compare").set_value(True).run()
    assert at.radio(key="attack.loss").disabled  # both losses are run
    at.number_input(key="attack.steps").set_value(30)
    at.button(key="btn.attack.run").click().run()
    assert not at.error, [e.value for e in at.error]
    record = at.session_state["attack.compare_record"]
    assert set(record.jobs) == {"l2", "cos"}
    assert all(job.view().running or job.view().snapshot is not None or job.finished for job in record.jobs.values())
    for job in record.jobs.values():
        assert job.wait(180)
    outcomes = {loss: job.view().outcome for loss, job in record.jobs.items()}
    assert all(o.steps == 30 and not o.cancelled for o in outcomes.values())
    assert {o.details.get("loss", loss) for loss, o in outcomes.items()} == {"l2", "cos"}
    tables = wait_for_app(at, lambda a: proxy_tables(a) if len(proxy_tables(a)) == 2 else None,
                      what="both runs' proxies")
    assert {"l2_max", "l2_min"} in tables and {"cos_max", "cos_min"} in tables  # each its own loss's LAVP
    assert any("grad_norm" in m.value for m in at.markdown)  # once, above both
    sentence = wait_for_app(at, lambda a: next((i.value for i in a.info if "leaked more" in i.value
                                            or "same SSIM" in i.value), None), what="the verdict")
    ssim = {loss: job.view().summary["ssim"] for loss, job in record.jobs.items()}
    winner = "cosine" if ssim["cos"] > ssim["l2"] else "L2"
    if ssim["cos"] != ssim["l2"]:
        assert f"the {winner} attack leaked more" in sentence
    assert "percentile" in sentence or "cannot be stated" in sentence


def test_stop_ends_both_compare_runs():
    at = open_attack(app())
    at.toggle(key="attack.compare").set_value(True).run()
    at.number_input(key="attack.steps").set_value(5000)
    at.button(key="btn.attack.run").click().run()
    record = at.session_state["attack.compare_record"]
    assert not at.button(key="btn.attack.stop").disabled
    at.button(key="btn.attack.stop").click().run()
    for job in record.jobs.values():
        assert job.wait(60), "Stop did not end both runs"
        assert job.view().state == "cancelled"
    at.run()
    assert not at.button(key="btn.attack.run").disabled


def test_rconv_offers_its_architectures_and_a_failure_leaves_no_full_progress_bar():
    at = open_attack(app())
    at.selectbox(key="attack.preset").set_value("rconv").run()
    assert at.button(key="btn.attack.arch.cnn-rconv")  # offered: the architectures R-CONV is made for
    at.button(key="btn.attack.run").click().run()
    record = at.session_state["attack.record"]
    assert record.job.wait(120)
    at.run()
    assert at.error and "cnn-rconv" in at.error[0].value  # the core's rank message names them
    assert not progress_texts(at)  # the message, not a full bar
    at.button(key="btn.attack.arch.cnn-rconv").click().run()
    assert at.session_state["side.arch"] == "cnn-rconv" and not at.error


def test_a_guide_demo_opens_the_attack_page_with_its_settings():
    at = app()  # the Guide is the default page
    at.button(key="btn.guide.demo.compare").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Attack"
    assert at.toggle(key="attack.compare").value is True
    assert at.selectbox(key="attack.preset").value == "lavp-paper"
    assert at.number_input(key="attack.steps").value == 2000
    assert at.session_state["side.arch"] == "lenet"
    assert at.button(key="btn.attack.run").proto.label == "Compare"

    at.switch_page("pages/guide.py").run()
    at.button(key="btn.guide.demo.rconv").click().run()
    assert at.title[0].value == "Attack" and at.selectbox(key="attack.preset").value == "rconv"
    assert at.session_state["side.arch"] == "cnn-rconv" and not at.error
