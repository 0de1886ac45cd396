"""Analysis of study results on hand-made tables: σ_S averaged over architectures, the paper's table
layouts, the rankings of Figure 1b/1c and the choice of images whose rankings disagree; each checked
against scipy or against a brute-force search written out here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lavp_core.errors import ConfigError
from lavp_core.study import (
    MEAN_ARCH,
    check_one_configuration,
    format_report,
    pick_disagreeing_images,
    rankings,
    spearman_table,
    table1,
    table3,
)

# ---- hand-made tables --------------------------------------------------------------------------


def _hand_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for arch in ("a", "b", "c"):
        for loss in ("l2", "cos"):
            for index in range(6):
                rows.append({"dataset": "d", "loss": loss, "arch": arch, "image_index": index,
                             "proxy_key": f"{arch}{index}", "mse": rng.random(), "ssim": rng.random(),
                             "psnr": rng.random(), "lpips": math.nan,
                             "exact_grad_norm": rng.random(),
                             "exact_l2_max": 5.0 if arch == "c" else rng.random(),  # constant on arch c
                             "exact_fusion": rng.random()})
    return pd.DataFrame(rows)


def test_spearman_is_averaged_over_architectures():
    df = _hand_table()
    table = spearman_table(df, "exact")
    for loss in ("l2", "cos"):
        for proxy in ("grad_norm", "l2_max"):
            per_arch = []
            for arch in ("a", "b", "c"):
                sub = df[(df["loss"] == loss) & (df["arch"] == arch)]
                if sub[f"exact_{proxy}"].nunique() > 1:
                    per_arch.append(stats.spearmanr(sub[f"exact_{proxy}"], sub["mse"]).statistic)
            mean = table[(table["loss"] == loss) & (table["proxy"] == proxy) & (table["score"] == "mse")
                         & (table["arch"] == MEAN_ARCH)].iloc[0]
            assert mean["rho"] == pytest.approx(np.mean(per_arch), abs=1e-12)
            assert mean["n"] == len(per_arch)  # the constant proxy on arch c has no σ_S and is left out
    assert table[table["score"] == "lpips"]["rho"].isna().all()


def test_table_layouts_match_the_paper():
    df = _hand_table()
    t1 = table1(df, "exact")
    assert list(t1.columns) == ["grad_norm", "l2_max"] and list(t1.index) == ["d+L2", "d+CS"]
    cell = t1.loc["d+L2", "grad_norm"]
    parts = cell.split(" / ")
    assert len(parts) == 4 and parts[3] == "n/a"
    table = spearman_table(df, "exact")
    mse = table[(table["loss"] == "l2") & (table["proxy"] == "grad_norm") & (table["arch"] == MEAN_ARCH)
                & (table["score"] == "mse")]["rho"].iloc[0]
    assert parts[0] == f"{mse:.2f}"
    assert list(table3(df, "exact").columns) == ["grad_norm", "fusion"]
    text = format_report(df, "md", flavours=("exact",))
    assert "## Table 1" in text and "d+L2" in text and "What the data says" in text


def test_rankings_on_figure_one():
    # Figure 1b: MSE under L2 ranks D > C > B > A ... the proxy for each loss predicts its own ranking
    mse_l2 = {"A": 0.01, "B": 0.05, "C": 0.03, "D": 0.09}
    mse_cos = {"A": 0.02, "B": 0.04, "C": 0.06, "D": 0.08}
    names = {"A": 0, "B": 1, "C": 2, "D": 3}
    rows = []
    for loss, mse in (("l2", mse_l2), ("cos", mse_cos)):
        for name, index in names.items():
            rows.append({"dataset": "d", "arch": "m", "loss": loss, "image_index": index, "mse": mse[name],
                         "exact_l2_max": mse_l2[name] * 10, "exact_cos_min": mse_cos[name] * 3,
                         "exact_grad_norm": 1.0 + index % 2})
    table = rankings(pd.DataFrame(rows), [0, 1, 2, 3]).set_index("name")
    assert table.loc["MSE (L2)", "ranking"] == "3 > 1 > 2 > 0"
    assert table.loc["MSE (CS)", "ranking"] == "3 > 2 > 1 > 0"
    assert table.loc["l2_max", "tau_l2"] == pytest.approx(1.0)
    assert table.loc["cos_min", "tau_cos"] == pytest.approx(1.0)
    assert table.loc["l2_max", "tau_cos"] == pytest.approx(stats.kendalltau([1, 5, 3, 9], [2, 4, 6, 8]).statistic)




def test_results_of_two_configurations_for_one_cell_are_refused():
    rows = [{"dataset": "photos", "loss": "l2", "arch": "lenet", "image_index": i, "study": name, "mse": 0.1 * i,
             "exact_grad_norm": float(i)} for name in ("short", "long") for i in range(4)]
    df = pd.DataFrame(rows)
    with pytest.raises(ConfigError, match="4 .image, architecture, weights, loss. cells .* involved: long, short"):
        spearman_table(df, proxies=["grad_norm"], scores=["mse"])
    with pytest.raises(ConfigError, match="more than one configuration"):
        rankings(df, [0, 1, 2], proxies=["grad_norm"])
    one = df[df["study"] == "long"]
    check_one_configuration(one)  # one configuration: accepted
    table = spearman_table(one, proxies=["grad_norm"], scores=["mse"])
    assert table.loc[table["arch"] == "lenet", "rho"].iloc[0] == pytest.approx(1.0)


# ---- images whose rankings disagree -------------------------------------------------------------------


def _pick_table(mse_l2: dict, mse_cos: dict, *, arch: str = "m", dataset: str = "d", **proxies: dict) -> list[dict]:
    """Rows of one (dataset, arch): one per (image, loss) with that loss's MSE; each proxy column
    (e.g. ``exact_l2_max={image: value}``) holds the image's value in both of its rows."""
    rows = []
    for loss, mse in (("l2", mse_l2), ("cos", mse_cos)):
        for index, value in mse.items():
            row = {"dataset": dataset, "arch": arch, "loss": loss, "image_index": index, "mse": value}
            row.update({column: values[index] for column, values in proxies.items()})
            rows.append(row)
    return rows


def test_pick_disagreeing_images_matches_a_brute_force_search():
    rng = np.random.default_rng(3)
    images = [2, 5, 8, 13, 21, 34, 55, 89]
    l2, cos, l2_max, cos_min = (dict(zip(images, rng.permutation(8) + 1.0, strict=True)) for _ in range(4))
    df = pd.DataFrame(_pick_table(l2, cos, exact_l2_max=l2_max, exact_cos_min=cos_min))

    def tau(a: dict, b: dict, subset) -> float:
        return stats.kendalltau([a[i] for i in subset], [b[i] for i in subset]).statistic

    # the documented order: lowest τ(MSE under L2, MSE under cos), then the best sum of the two LAVPs' τ
    # with their own loss's MSE; every 4 of the 8 images is a candidate (8 <= max_candidates)
    scored = sorted((round(tau(l2, cos, c), 9), -round(tau(l2_max, l2, c) + tau(cos_min, cos, c), 9), c)
                    for c in itertools.combinations(images, 4))
    assert scored[0][:2] != scored[1][:2]  # one best subset: the test does not depend on tie order
    assert pick_disagreeing_images(df, "m", count=4) == list(scored[0][2])
    assert scored[0][0] < 0  # its rankings really disagree


def test_pick_disagreeing_images_breaks_ties_with_the_chosen_flavour():
    # MSE: L2 ranks 10 < 11 < 12 < 13, cos swaps each pair: {10, 11} and {12, 13} both have τ = -1
    l2 = {10: 0.1, 11: 0.2, 12: 0.3, 13: 0.4}
    cos = {10: 0.2, 11: 0.1, 12: 0.4, 13: 0.3}
    # exact LAVPs predict each loss's ranking on {12, 13} only; the paper-recipe values on {10, 11} only
    exact_l2_max, exact_cos_min = {10: 2, 11: 1, 12: 1, 13: 2}, {10: 1, 11: 2, 12: 2, 13: 1}
    paper_l2_max, paper_cos_min = {10: 1, 11: 2, 12: 2, 13: 1}, {10: 2, 11: 1, 12: 1, 13: 2}
    df = pd.DataFrame(_pick_table(l2, cos, exact_l2_max=exact_l2_max, exact_cos_min=exact_cos_min,
                                  paper_l2_max=paper_l2_max, paper_cos_min=paper_cos_min))
    assert pick_disagreeing_images(df, "m", count=2) == [12, 13]
    assert pick_disagreeing_images(df, "m", count=2, flavour="paper") == [10, 11]
    # no proxy values: the two subsets tie, the first (lowest indices) is chosen
    bare = pd.DataFrame(_pick_table(l2, cos))
    assert pick_disagreeing_images(bare, "m", count=2) == [10, 11]


def test_pick_disagreeing_images_counts_only_complete_images_of_the_chosen_model():
    l2 = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5}
    cos = {0: 0.5, 1: 0.4, 2: 0.3, 3: 0.2, 4: math.nan}  # image 4 has no cos result
    # another model and another dataset whose images would disagree differently
    noise = _pick_table({7: 0.1, 8: 0.2, 9: 0.3}, {7: 0.3, 8: 0.2, 9: 0.1}, arch="other")
    noise += _pick_table({0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, {0: 0.1, 1: 0.2, 2: 0.4, 3: 0.3}, dataset="e")
    df = pd.DataFrame(_pick_table(l2, cos) + noise)
    # cos reverses L2 on images 0-3, so every 3 of them disagree fully; the first such subset is chosen
    assert pick_disagreeing_images(df, "m", count=3, dataset="d") == [0, 1, 2]
    # four usable images (4 lacks cos) and count 4: all of them, in order
    assert pick_disagreeing_images(df, "m", count=4, dataset="d") == [0, 1, 2, 3]
    # dataset e alone on m: only images 2 and 3 disagree
    assert pick_disagreeing_images(df, "m", count=2, dataset="e") == [2, 3]
    # one loss only: the first `count` image indices; an unknown model: none
    assert pick_disagreeing_images(df[df["loss"] == "l2"], "m", count=2, dataset="d") == [0, 1]
    assert pick_disagreeing_images(df, "no-such-model") == []


# ---- statistics a reviewer accepts ------------------------------------------------------------------


def test_the_bootstrap_interval_covers_the_true_rho_and_matches_scipy():
    """A monotone relation with noise: the interval contains the population σ_S, excludes 0, and agrees
    with scipy.stats.bootstrap's percentile interval on the same statistic."""
    from lavp_core.study.analysis import bootstrap_spearman, percentile_interval

    rng = np.random.default_rng(7)
    x = rng.normal(size=80)
    y = np.exp(x) + rng.normal(scale=0.8, size=80)  # monotone signal + noise
    big = rng.normal(size=200_000)  # the population σ_S of the same model, by simulation
    truth = stats.spearmanr(big, np.exp(big) + rng.normal(scale=0.8, size=big.size)).statistic
    low, high = percentile_interval(bootstrap_spearman(x, y, resamples=2000, seed=1))
    assert low < truth < high and low > 0
    reference = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                                vectorized=False, n_resamples=2000, method="percentile",
                                random_state=np.random.default_rng(1)).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.03) and high == pytest.approx(reference.high, abs=0.03)
    noise = rng.normal(size=80)
    low0, high0 = percentile_interval(bootstrap_spearman(x, noise, resamples=2000, seed=1))
    assert low0 < 0 < high0  # no relation: the interval straddles 0


def test_spearman_table_carries_p_values_intervals_and_excluded_uncertified_values():
    df = _hand_table()
    df["exact_l2_max_converged"] = [i % 5 != 0 for i in range(len(df))]  # every fifth value uncertified
    table = spearman_table(df, "exact", scores=["mse"])
    row = table[(table["loss"] == "l2") & (table["proxy"] == "l2_max") & (table["arch"] == "a")].iloc[0]
    sub = df[(df["loss"] == "l2") & (df["arch"] == "a")]
    kept = sub[sub["exact_l2_max_converged"]]
    reference = stats.spearmanr(kept["exact_l2_max"], kept["mse"])
    assert row["rho"] == pytest.approx(reference.statistic) and row["p"] == pytest.approx(reference.pvalue)
    assert row["n"] == len(kept) and row["excluded"] == len(sub) - len(kept)
    assert row["ci_low"] <= row["rho"] <= row["ci_high"]
    with_all = spearman_table(df, "exact", scores=["mse"], include_uncertified=True)
    row_all = with_all[(with_all["loss"] == "l2") & (with_all["proxy"] == "l2_max") & (with_all["arch"] == "a")]
    assert row_all["n"].iloc[0] == len(sub) and row_all["excluded"].iloc[0] == 0


def test_findings_follow_the_sign_and_warn_where_attacks_failed():
    """Negative σ_S never 'beats' the gradient norm, however large in size; a failed group says so."""
    from lavp_core.study.analysis import findings

    def row(proxy, rho, low, high):
        return {"flavour": "exact", "dataset": "d", "weights": "random", "loss": "l2", "arch": MEAN_ARCH,
                "proxy": proxy, "score": "mse", "rho": rho, "p": math.nan, "ci_low": low, "ci_high": high, "n": 2,
                "excluded": 0}

    table = pd.DataFrame([row("grad_norm", -0.45, -0.6, -0.3), row("l2_max", -0.46, -0.6, -0.3),
                          row("l2_min", 0.30, 0.1, 0.5)])
    recovery = pd.DataFrame([{"dataset": "d", "weights": "random", "loss": "l2", "arch": MEAN_ARCH, "n": 100,
                              "recovered": 0.06, "median_psnr": 9.0, "median_ssim": 0.02, "regime": "failed"}])
    (line,) = findings(table, recovery)
    assert "l2_max does not beat grad_norm (its σ_S is not positive" in line
    assert "l2_min beats grad_norm (positive, above it, and its interval excludes 0)" in line
    assert "only 6% of these attacks recovered the image" in line and "images' own statistics" in line
    leaking = recovery.assign(recovered=0.6, regime="leaks")
    assert "Caution" not in findings(table, leaking)[0]
    saturated = recovery.assign(recovered=0.875, regime="saturated")
    (line,) = findings(table, saturated)
    assert "Caution: 88% of these attacks recovered the image" in line and "how exactly" in line


def test_the_regime_of_a_group_follows_its_recovered_fraction():
    from lavp_core.study.analysis import recovery_table, regime, regime_notice

    assert [regime(f) for f in (0.0, 0.19, 0.2, 0.5, 0.8, 0.81, 1.0)] == [
        "failed", "failed", "leaks", "leaks", "leaks", "saturated", "saturated"]
    assert regime_notice(0.5) == "" and "own statistics" in regime_notice(0.1)
    assert regime_notice(1.0).startswith("every one of these attacks recovered the image")
    # 10 images per loss: L2 recovers 1 (SSIM 0.6), cosine 9
    ssim = {"l2": [0.6] + [0.1] * 9, "cos": [0.9] * 9 + [0.2]}
    df = pd.DataFrame([{"dataset": "d", "weights": "random", "loss": loss, "arch": "lenet", "image_index": i,
                        "ssim": value, "psnr": 10 + 20 * value} for loss, values in ssim.items()
                       for i, value in enumerate(values)])
    table = recovery_table(df).set_index(["loss", "arch"])
    assert table.loc[("l2", "lenet"), "regime"] == "failed" and table.loc[("l2", "lenet"), "recovered"] == 0.1
    assert table.loc[("cos", MEAN_ARCH), "regime"] == "saturated" and table.loc[("cos", "lenet"), "n"] == 10


def test_the_tidy_csv_round_trips_through_pandas(tmp_path):
    import io

    df = _hand_table().assign(study="hand", weights="random", ssim=0.3, psnr=12.0)
    text = format_report(df, "csv", flavours=("exact",))
    back = pd.read_csv(io.StringIO(text))
    assert list(back.columns[:8]) == ["study", "dataset", "weights", "arch", "loss", "proxy", "flavour", "score"]
    assert not back.duplicated(["arch", "loss", "proxy", "flavour", "score"]).any()
    assert back["sigma"].dtype == float and not back["sigma"].astype(str).str.contains("/").any()
    long = spearman_table(df, "exact")
    merged = back.merge(long, on=["arch", "loss", "proxy", "score"])
    assert np.allclose(merged["sigma"], merged["rho"], equal_nan=True)
    assert set(back["regime"]) == {"failed"}  # SSIM 0.3 everywhere: nothing recovered


def test_model_states_sort_by_epoch_not_as_text():
    from lavp_core.study.analysis import weights_order

    states = ["trained@40", "trained@5", "random", "trained@0", "trained", "trained@1"]
    assert sorted(states, key=weights_order) == ["random", "trained", "trained@0", "trained@1", "trained@5",
                                                 "trained@40"]


def test_the_recovery_table_lists_l2_before_cosine_and_snapshots_by_epoch():
    from lavp_core.study.analysis import recovery_table

    df = pd.DataFrame([{"dataset": "d", "weights": w, "loss": loss, "arch": "lenet", "image_index": 0,
                        "ssim": 0.6, "psnr": 20.0} for w in ("trained@40", "trained@5") for loss in ("cos", "l2")])
    table = recovery_table(df)
    rows = table[table["arch"] == "lenet"][["loss", "weights"]].apply(tuple, axis=1).tolist()
    assert rows == [("l2", "trained@5"), ("l2", "trained@40"), ("cos", "trained@5"), ("cos", "trained@40")]
