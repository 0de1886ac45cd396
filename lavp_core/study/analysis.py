"""The paper's evaluation of the proxies on stored results (its "Evaluation Metric" section): Spearman's
σ_S between each proxy and each similarity score over the images of one (dataset, attack loss,
architecture), then the mean of σ_S over architectures (:func:`spearman_table`); the exact-vs-recipe
agreement (:func:`recipe_agreement`); plain statements of what the σ_S table says (:func:`findings`);
the rankings behind Figure 1b/1c with Kendall's τ (:func:`rankings`) and the images whose rankings
under the two attack losses disagree most (:func:`pick_disagreeing_images`).

Everything here takes a DataFrame as from :func:`~lavp_core.study.results.load_results` (or one made
by hand with the same columns) and returns plain data.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .plan import FLAVOURS, Flavour
from .results import check_one_configuration, proxy_column, proxy_names

SCORES = ("mse", "ssim", "psnr", "lpips")  # the paper's cell order: MSE / SSIM / PSNR / LPIPS
ALL_SCORES = (*SCORES, "rel_mse")  # plus MSE over the truth's pixel variance (1 = no better than its mean colour)
MEAN_ARCH = "mean"  # the ``arch`` of the rows of spearman_table averaged over architectures
STATE = ["dataset", "weights", "loss"]  # one study group: σ_S is averaged over the architectures within it
RESAMPLES = 1000  # bootstrap resamples behind every confidence interval
CONFIDENCE = 0.95
FAILED_REGIME = 0.2  # below this fraction of recovered images a group's σ_S describe image statistics
SATURATED_REGIME = 0.8  # above this fraction they rank how exactly recovered images were rebuilt
LOSS_LABELS = {"l2": "L2", "cos": "CS", "cos-layer": "CS-layer"}


def _rank_correlation(name: str, x: Iterable[float], y: Iterable[float], minimum: int) -> tuple[float, float, int]:
    """``scipy.stats.<name>`` over the pairs where neither value is NaN: (statistic, p-value, pairs);
    NaN when fewer than ``minimum`` pairs or either side is constant."""
    from scipy import stats

    a = np.asarray(list(x), dtype=float)
    b = np.asarray(list(y), dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n < minimum or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan, math.nan, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = getattr(stats, name)(a, b)
    return float(result.statistic), float(result.pvalue), n


def spearman(x: Iterable[float], y: Iterable[float]) -> tuple[float, float, int]:
    """Spearman's σ_S and its p-value (``scipy.stats.spearmanr``) over the pairs where neither value is
    NaN, and the number of pairs; NaN when fewer than 3 pairs or either side is constant."""
    return _rank_correlation("spearmanr", x, y, 3)


def kendall(x: Iterable[float], y: Iterable[float]) -> tuple[float, float, int]:
    """Kendall's τ and p-value (``scipy.stats.kendalltau``) over the pairs without NaN, and their count
    (NaN when fewer than 2 pairs or either side is constant)."""
    return _rank_correlation("kendalltau", x, y, 2)


def _paired(x: Iterable[float], y: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(list(x), dtype=float)
    b = np.asarray(list(y), dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def bootstrap_spearman(x: Iterable[float], y: Iterable[float], *, resamples: int = RESAMPLES,
                       seed: int = 0) -> np.ndarray:
    """σ_S of ``resamples`` bootstrap resamples of the (x, y) pairs without NaN (pairs drawn with
    replacement by ``numpy.random.default_rng(seed)``); a resample with a constant side gives NaN.
    Fewer than 3 pairs: all NaN."""
    from scipy import stats

    a, b = _paired(x, y)
    n = a.size
    if n < 3:
        return np.full(resamples, math.nan)
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (B, n)
    ra = stats.rankdata(a[index], axis=1)
    rb = stats.rankdata(b[index], axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=1) / np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` interval of the finite ``samples`` (NaN, NaN when under half are finite)."""
    finite = samples[np.isfinite(samples)]
    if finite.size < max(2, samples.size // 2):
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _group_seed(*parts: object) -> int:
    from .plan import derive_seed

    return derive_seed("bootstrap", *parts) % 2 ** 32


def uncertified_mask(df: pd.DataFrame, proxy: str, flavour: Flavour) -> pd.Series:
    """Rows whose ``exact`` value of ``proxy`` is not certified (an exact λ_min below float64's resolution,
    or a fusion of one): left out of σ_S unless asked for. The paper recipe's values are never certified
    and always kept: they are what the recipe reports."""
    column = proxy_column(proxy, flavour) + "_converged"
    if flavour != "exact" or column not in df:
        return pd.Series(False, index=df.index)
    return ~df[column].astype(bool)


def spearman_table(df: pd.DataFrame, proxy_flavour: Flavour = "exact", *, scores: Sequence[str] = ALL_SCORES,
                   proxies: Sequence[str] | None = None, include_uncertified: bool = False,
                   resamples: int = RESAMPLES) -> pd.DataFrame:
    """σ_S between each proxy and each score, per (dataset, weights, attack loss, architecture), and
    averaged over architectures, each with its p-value and a bootstrap confidence interval.

    Args:
        df: jobs as from :func:`load_results` (columns ``dataset``, ``loss``, ``arch``, optionally
            ``weights``, the scores and ``{flavour}_{proxy}``).
        proxy_flavour: ``exact`` or ``paper``.
        scores: score columns (default: MSE, SSIM, PSNR, LPIPS and ``rel_mse``); a missing one gives NaN.
        proxies: proxy names (default: every proxy of the flavour in ``df``).
        include_uncertified: keep exact values that are not certified (see :func:`uncertified_mask`);
            by default they are left out and counted in ``excluded``.
        resamples: bootstrap resamples (images drawn with replacement, deterministic per group).

    Returns:
        Long DataFrame with columns ``flavour, dataset, weights, loss, arch, proxy, score, rho, p,
        ci_low, ci_high, n, excluded``. Rows with ``arch == "mean"`` hold the paper's final metric: the
        mean over architectures of the per-arch σ_S (architectures whose σ_S is undefined are left out;
        ``n`` then counts the architectures averaged, ``p`` is NaN, and the interval is that of the mean
        of the architectures' bootstrap σ_S, each architecture resampled on its own).
    """
    columns = ["flavour", "dataset", "weights", "loss", "arch", "proxy", "score", "rho", "p", "ci_low", "ci_high",
               "n", "excluded"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    check_one_configuration(df)
    names = list(proxies) if proxies is not None else proxy_names(df, proxy_flavour)
    missing = [p for p in names if proxy_column(p, proxy_flavour) not in df]
    if missing:
        raise ConfigError(f"no {proxy_flavour} values of proxies {missing} in these results")
    df = df.assign(weights=df["weights"].fillna("") if "weights" in df else "")
    out = []
    for (dataset, weights, loss), group in df.groupby(STATE, sort=True):
        for proxy in names:
            dropped = uncertified_mask(group, proxy, proxy_flavour) & (not include_uncertified)
            for score in scores:
                per_arch, boots = [], []
                for arch, sub in group.groupby("arch", sort=True):
                    values = sub[score] if score in sub else pd.Series(np.nan, index=sub.index)
                    proxy_values = sub[proxy_column(proxy, proxy_flavour)].where(~dropped.loc[sub.index])
                    rho, p, n = spearman(proxy_values, values)
                    boot = bootstrap_spearman(proxy_values, values, resamples=resamples,
                                              seed=_group_seed(proxy_flavour, dataset, weights, loss, arch, proxy,
                                                               score))
                    low, high = percentile_interval(boot) if not math.isnan(rho) else (math.nan, math.nan)
                    out.append((proxy_flavour, dataset, weights, loss, arch, proxy, score, rho, p, low, high, n,
                                int(dropped.loc[sub.index].sum())))
                    if not math.isnan(rho):
                        per_arch.append(rho)
                        boots.append(boot)
                mean = float(np.mean(per_arch)) if per_arch else math.nan
                low, high = percentile_interval(np.mean(boots, axis=0)) if boots else (math.nan, math.nan)
                out.append((proxy_flavour, dataset, weights, loss, MEAN_ARCH, proxy, score, mean, math.nan, low,
                            high, len(per_arch), int(dropped.sum())))
    return pd.DataFrame(out, columns=columns)


def recovery_table(df: pd.DataFrame) -> pd.DataFrame:
    """Did the attacks leak? Per (dataset, weights, attack loss, architecture) and over all architectures
    (``arch == "mean"``): images, the fraction recovered (SSIM at least
    :data:`~lavp_core.metrics.RECOVERED_SSIM`), median PSNR and SSIM, and the regime (:func:`regime`):
    ``failed`` below :data:`FAILED_REGIME` recovered (σ_S over failed attacks describe the images' own
    statistics, not leakage), ``saturated`` above :data:`SATURATED_REGIME` (σ_S rank how exactly
    recovered images were rebuilt, not which images leak), else ``leaks``."""
    from ..metrics import RECOVERED_SSIM

    columns = ["dataset", "weights", "loss", "arch", "n", "recovered", "median_psnr", "median_ssim", "regime"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    df = df.assign(weights=df["weights"].fillna("") if "weights" in df else "",
                   recovered=df["ssim"] >= RECOVERED_SSIM)
    out = []
    groups = sorted(df.groupby(STATE, sort=False), key=lambda item: group_order(*item[0]))
    for (dataset, weights, loss), group in groups:
        parts = [(arch, sub) for arch, sub in group.groupby("arch", sort=True)] + [(MEAN_ARCH, group)]
        for arch, sub in parts:
            fraction = float(sub["recovered"].mean())
            out.append((dataset, weights, loss, arch, int(len(sub)), fraction, float(sub["psnr"].median()),
                        float(sub["ssim"].median()), regime(fraction)))
    return pd.DataFrame(out, columns=columns)


def regime(recovered: float) -> str:
    """``failed``, ``leaks`` or ``saturated`` for the fraction of a group's attacks that recovered the image."""
    if math.isnan(recovered):
        return "unknown"
    if recovered < FAILED_REGIME:
        return "failed"
    return "saturated" if recovered > SATURATED_REGIME else "leaks"


def regime_notice(recovered: float) -> str:
    """The sentence shown beside σ_S of a group whose attacks mostly failed, or almost all recovered the
    image (empty when some leak and some do not: the regime where σ_S says which images leak)."""
    kind = regime(recovered)
    if kind == "failed":
        share = "none" if recovered == 0 else f"only {recovered:.0%}"
        return (f"{share} of these attacks recovered the image (SSIM ≥ 0.5): their σ_S describe the images' own "
                f"statistics, not leakage")
    if kind == "saturated":
        share = "every one" if recovered == 1 else f"{recovered:.0%}"
        return (f"{share} of these attacks recovered the image (SSIM ≥ 0.5): their σ_S rank how exactly "
                f"recovered images were rebuilt, not which images leak")
    return ""


def loss_label(loss: str) -> str:
    """The paper's label of an attack loss (``l2`` → ``L2``, ``cos`` → ``CS``)."""
    return LOSS_LABELS.get(loss, loss.upper())


def weights_order(weights: str) -> tuple:
    """Sort key of model states: named states (``random``, ``trained``) by name, then training
    snapshots by epoch (``trained@5`` before ``trained@40``)."""
    from ..models import snapshot_epoch

    try:
        epoch = snapshot_epoch(str(weights))
    except ConfigError:
        epoch = None
    return (0, 0, str(weights)) if epoch is None else (1, epoch, str(weights))


def group_order(dataset: str, weights: str, loss: str) -> tuple:
    """Sort key of a (dataset, weights, loss) group: :func:`row_order`, then :func:`weights_order`."""
    return (*row_order((dataset, loss)), weights_order(weights))


def row_order(pair: tuple[str, str]) -> tuple:
    """Sort key of (dataset, loss) rows: by dataset, then L2, CS, then any other loss by name."""
    dataset, loss = pair
    known = list(LOSS_LABELS)
    return dataset, known.index(loss) if loss in known else len(known), loss


def recipe_agreement(df: pd.DataFrame) -> pd.DataFrame:
    """How well the paper's recipe reproduces the exact values, per (dataset, arch, proxy): σ_S between
    the two flavours over the images, the median relative difference |paper − exact| / |exact|, and the
    fraction of recipe values and of exact values certified converged (an exact λ_min below float64's
    resolution, about 1e-16·λ_max, is computed but cannot be certified to a relative tolerance). One
    row per image and model (jobs sharing proxies are counted once)."""
    columns = ["dataset", "arch", "proxy", "rho", "median_rel_diff", "paper_converged", "exact_converged", "n"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    common = [p for p in proxy_names(df, "exact") if p in proxy_names(df, "paper")]
    unique = df.drop_duplicates("proxy_key")
    out = []
    for (dataset, arch), sub in unique.groupby(["dataset", "arch"], sort=True):
        for proxy in common:
            exact = sub[proxy_column(proxy, "exact")].to_numpy(float)
            paper = sub[proxy_column(proxy, "paper")].to_numpy(float)
            rho, _, n = spearman(exact, paper)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.abs(paper - exact) / np.abs(exact)
            rel = rel[np.isfinite(rel)]
            fractions = []
            for flavour in ("paper", "exact"):  # the order of the columns
                conv = sub.get(proxy_column(proxy, flavour) + "_converged")
                fractions.append(float(conv.mean()) if conv is not None and len(conv) else math.nan)
            out.append((dataset, arch, proxy, rho, float(np.median(rel)) if rel.size else math.nan,
                        *fractions, n))
    return pd.DataFrame(out, columns=columns)


def beats(value: float, base: float) -> bool:
    """The paper's sense of "a proxy beats the gradient norm": its σ_S with MSE is larger than the gradient
    norm's *and* positive (larger proxy, larger error, as the paper claims), not merely larger in size."""
    return not (math.isnan(value) or math.isnan(base)) and value > 0 and value > base


def findings(table: pd.DataFrame, recovery: pd.DataFrame | None = None) -> list[str]:
    """Plain statements of what the σ_S table says, computed from it: for each (dataset, model state,
    attack loss) and flavour, the σ_S with MSE (averaged over architectures, with its confidence interval)
    of ``grad_norm`` and of that loss's own LAVP, whether each LAVP beats the gradient norm in the paper's
    sense (:func:`beats`), whether its interval excludes 0, and, from ``recovery``
    (:func:`recovery_table`), a warning where the attacks mostly failed."""
    from ..proxies import proxy_key

    lines = []
    mean = table[(table["arch"] == MEAN_ARCH) & (table["score"] == "mse")]
    if "weights" not in mean:
        mean = mean.assign(weights="")
    cells = {(r.flavour, r.dataset, r.weights, r.loss, r.proxy): r for r in mean.itertuples()}
    regime = {}
    if recovery is not None and not recovery.empty:
        overall = recovery[recovery["arch"] == MEAN_ARCH]
        regime = {(r.dataset, r.weights, r.loss): r.recovered for r in overall.itertuples()}
    flavours = [f for f in FLAVOURS if f in set(mean["flavour"])]
    groups = sorted({(r.dataset, r.weights, r.loss) for r in mean.itertuples()},
                    key=lambda g: group_order(g[0], g[1], g[2]))
    for dataset, weights, loss in groups:
        label = f"{dataset}+{loss_label(loss)}" + (f" ({weights})" if weights else "")
        for flavour in flavours:
            base_row = cells.get((flavour, dataset, weights, loss, "grad_norm"))
            base = base_row.rho if base_row is not None else math.nan
            parts = [f"grad_norm {_with_interval(base_row)}"] if base_row is not None else []
            verdicts = []
            for extreme in ("max", "min"):
                row = cells.get((flavour, dataset, weights, loss, proxy_key(loss, extreme)))
                if row is None:
                    continue
                parts.append(f"{row.proxy} {_with_interval(row)}")
                if math.isnan(row.rho) or math.isnan(base):
                    verdicts.append(f"{row.proxy}: undefined")
                    continue
                if row.rho <= 0:
                    verdict = "does not beat grad_norm (its σ_S is not positive, against the paper's claim)"
                elif not beats(row.rho, base):
                    verdict = "does not beat grad_norm (positive, but not above it)"
                elif not math.isnan(row.ci_low) and row.ci_low > 0:
                    verdict = "beats grad_norm (positive, above it, and its interval excludes 0)"
                else:
                    verdict = "beats grad_norm in value (positive and above it), but its interval includes 0"
                verdicts.append(f"{row.proxy} {verdict}")
            line = f"{label} ({flavour}): σ_S with MSE: {', '.join(parts)}; {'; '.join(verdicts)}"
            notice = regime_notice(regime.get((dataset, weights, loss), math.nan))
            lines.append(line + (f". Caution: {notice}" if notice else ""))
    return lines


def _with_interval(row) -> str:
    if row is None or math.isnan(row.rho):
        return "n/a"
    ci = "" if math.isnan(row.ci_low) else f" [{row.ci_low:+.2f}, {row.ci_high:+.2f}]"
    return f"{row.rho:+.2f}{ci}"


def _signed(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.2f}"


def rankings(df: pd.DataFrame, images: Sequence[int], *, proxy_flavour: Flavour = "exact",
             arch: str | None = None, dataset: str | None = None, proxies: Sequence[str] | None = None) -> pd.DataFrame:
    """The data behind Figure 1b/1c for the chosen image indices, per (dataset, architecture).

    Rows of kind ``observed``: each attack loss's MSE ranking (largest MSE first, as "D > B > C > A").
    Rows of kind ``predicted``: each proxy's ranking (largest value first: the paper expects larger
    proxies for worse reconstructions). Columns ``tau_<loss>`` / ``p_<loss>``: Kendall's τ
    (``scipy.stats.kendalltau``) between the row's values and that loss's MSE over the images.
    """
    if df.empty:
        raise ConfigError("no finished jobs to rank")
    images = [int(i) for i in images]
    if len(images) < 2:
        raise ConfigError("rankings need at least two image indices, e.g. --images 0,5,9,12")
    check_one_configuration(df)
    sub = df[df["image_index"].isin(images)]
    if arch is not None:
        sub = sub[sub["arch"] == arch]
    if dataset is not None:
        sub = sub[sub["dataset"] == dataset]
    found = sorted(set(sub["image_index"]))
    if len(found) < 2:
        scope = df if arch is None else df[df["arch"] == arch]
        available = sorted(set(scope["image_index"]))
        shown = ", ".join(str(i) for i in available[:20]) + (" …" if len(available) > 20 else "")
        raise ConfigError(f"rankings need finished jobs for at least two of the images {images}"
                          + (f" on {arch}" if arch else "") + f"; images with results: {shown or 'none'}")
    names = list(proxies) if proxies is not None else proxy_names(sub, proxy_flavour)
    out = []
    for (ds, model), group in sub.groupby(["dataset", "arch"], sort=True):
        losses = sorted(set(group["loss"]))
        mse = {loss: group[group["loss"] == loss].set_index("image_index")["mse"].reindex(images)
               for loss in losses}
        rows: list[tuple[str, str, pd.Series]] = [("observed", f"MSE ({loss_label(loss)})", mse[loss])
                                                   for loss in losses]
        per_image = group.drop_duplicates("image_index").set_index("image_index").reindex(images)
        rows += [("predicted", p, per_image[proxy_column(p, proxy_flavour)]) for p in names]
        for kind, name, values in rows:
            record = {"dataset": ds, "arch": model, "kind": kind, "name": name, "ranking": _ranking(values)}
            for loss in losses:
                tau, p, _ = kendall(values.to_numpy(float), mse[loss].to_numpy(float))
                record[f"tau_{loss}"], record[f"p_{loss}"] = tau, p
            out.append(record)
    return pd.DataFrame(out)


def _ranking(values: pd.Series) -> str:
    known = values.dropna().sort_values(ascending=False, kind="stable")
    text = " > ".join(str(int(i)) for i in known.index)
    missing = [str(int(i)) for i in values.index if pd.isna(values.get(i))]
    return text + (f" (missing: {', '.join(missing)})" if missing else "")


def pick_disagreeing_images(df: pd.DataFrame, arch: str, *, count: int = 4, dataset: str | None = None,
                            flavour: Flavour = "exact", max_candidates: int = 24) -> list[int]:
    """``count`` image indices whose MSE rankings under the L2 and the cosine attack disagree most
    (lowest Kendall τ between them), ties broken by how well each loss's own LAVP (``l2_max``,
    ``cos_min``) predicts its ranking: the situation of the paper's Figure 1b/1c.

    Only images with results for both losses on ``arch`` count; the ``max_candidates`` images whose MSE
    ranks differ most between the losses are searched exhaustively. Fewer than ``count`` usable images:
    all of them.

    Args:
        df: jobs as from :func:`~lavp_core.study.results.load_results` (columns ``arch``, ``dataset``,
            ``loss``, ``image_index``, ``mse`` and the ``{flavour}_l2_max`` / ``{flavour}_cos_min``
            proxy columns where available).
        arch: the architecture whose jobs count; ``dataset``: only this dataset's jobs (default: all).
        flavour: which proxy values break ties.

    Returns:
        Image indices in increasing order; when ``df`` lacks one of the losses on ``arch``, the first
        ``count`` of its image indices.
    """
    sub = df[df["arch"] == arch]
    if dataset is not None:
        sub = sub[sub["dataset"] == dataset]
    if sub.empty or not {"l2", "cos"} <= set(sub["loss"]):
        return sorted(int(i) for i in sub["image_index"].unique())[:count]
    mse = sub.pivot_table(index="image_index", columns="loss", values="mse", aggfunc="first")[["l2", "cos"]]
    mse = mse.dropna()
    if len(mse) <= count:
        return sorted(int(i) for i in mse.index)
    ranks = mse.rank()
    spread = (ranks["l2"] - ranks["cos"]).abs().sort_values(ascending=False, kind="stable")
    candidates = sorted(int(i) for i in spread.index[:max_candidates])
    per_image = sub.drop_duplicates("image_index").set_index("image_index").reindex(candidates)

    def signs(values) -> np.ndarray:  # (n, n): sign(v_i - v_j), 0 where either is NaN
        v = np.asarray(values, dtype=float)
        out = np.sign(v[:, None] - v[None, :])
        return np.nan_to_num(out, nan=0.0)

    combos = np.array(list(itertools.combinations(range(len(candidates)), count)))  # (K, count)
    pairs = list(itertools.combinations(range(count), 2))

    def tau(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # Kendall's τ-a of every combination, (K,)
        s = a * b
        return np.mean([s[combos[:, i], combos[:, j]] for i, j in pairs], axis=0)

    l2, cos = signs(mse.loc[candidates, "l2"]), signs(mse.loc[candidates, "cos"])
    disagreement = tau(l2, cos)
    fit = np.zeros(len(combos))
    for mse_signs, proxy in ((l2, "l2_max"), (cos, "cos_min")):
        column = proxy_column(proxy, flavour)
        if column in per_image:
            fit += tau(signs(per_image[column]), mse_signs)
    best = int(np.lexsort((-fit, disagreement))[0])  # lowest τ(L2, cos), then best LAVP fit
    return [candidates[i] for i in combos[best]]
