"""The study report: the paper's Table 1 and Table 3 layouts of σ_S (:func:`table1`, :func:`table3`),
everything the report shows as plain data (:func:`report_data`), and that data as Markdown, CSV or JSON
(:func:`format_report`, :func:`format_rankings`); the one-line account of a run (:func:`summarise`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from ..errors import ConfigError, StoreError
from .analysis import (
    MEAN_ARCH,
    SCORES,
    STATE,
    findings,
    group_order,
    loss_label,
    recipe_agreement,
    recovery_table,
    regime_notice,
    spearman_table,
)
from .plan import FLAVOURS, Flavour
from .results import proxy_column, proxy_names

if TYPE_CHECKING:
    from .executors import StudySummary


def _cell(values: Sequence[float]) -> str:
    return " / ".join("n/a" if v is None or math.isnan(v) else f"{v:.2f}" for v in values)


def table1(df: pd.DataFrame, proxy_flavour: Flavour = "exact", *, proxies: Sequence[str] | None = None,
           table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 1's layout: rows ``<dataset>+<L2|CS>``, columns the proxies (``grad_norm``, ``l2_max``,
    ``l2_min``, ``cos_max``, ``cos_min``, then any other but ``fusion``); each cell is the σ_S averaged
    over architectures, "MSE / SSIM / PSNR / LPIPS", with ``n/a`` where undefined (LPIPS not computed)."""
    if proxies is None:
        proxies = [p for p in proxy_names(df, proxy_flavour) if p != "fusion"]
    return _layout(df, proxy_flavour, list(proxies), table)


def table3(df: pd.DataFrame, proxy_flavour: Flavour = "exact", *, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 3's layout: ``grad_norm`` against the loss-agnostic ``fusion`` sqrt(l2_max · cos_min)."""
    proxies = [p for p in ("grad_norm", "fusion") if proxy_column(p, proxy_flavour) in df]
    return _layout(df, proxy_flavour, proxies, table)


def row_label(dataset: str, weights: str, loss: str, several_states: bool) -> str:
    """A table row's name: ``photos+L2``, with the model state when a study spans several."""
    return f"{dataset}+{loss_label(loss)}" + (f" ({weights})" if several_states and weights else "")


def _groups(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    weights = df["weights"].fillna("") if "weights" in df else pd.Series("", index=df.index)
    found = {(d, w, lo) for d, w, lo in zip(df["dataset"], weights, df["loss"], strict=True)}
    return sorted(found, key=lambda g: group_order(*g))


def _layout(df: pd.DataFrame, flavour: Flavour, proxies: list[str], table: pd.DataFrame | None) -> pd.DataFrame:
    if df.empty or not proxies:
        return pd.DataFrame(columns=proxies)
    table = spearman_table(df, flavour, proxies=proxies) if table is None else table
    mean = table[(table["arch"] == MEAN_ARCH) & (table["flavour"] == flavour)]
    rho = {(r.dataset, r.weights, r.loss, r.proxy, r.score): r.rho for r in mean.itertuples()}
    groups = _groups(df)
    several = len({g[1] for g in groups}) > 1
    rows, labels = [], []
    for dataset, weights, loss in groups:
        labels.append(row_label(dataset, weights, loss, several))
        rows.append([_cell([rho.get((dataset, weights, loss, p, s), math.nan) for s in SCORES]) for p in proxies])
    return pd.DataFrame(rows, index=pd.Index(labels, name="σ_S"), columns=proxies)


def tidy_table(df: pd.DataFrame, long: pd.DataFrame, recovery: pd.DataFrame) -> pd.DataFrame:
    """The σ_S table for export: one row per (study, dataset, weights, arch, loss, proxy, flavour, score),
    one value per cell (``sigma``, ``p``, ``ci_low``, ``ci_high``, ``n``, ``excluded``), with the group's
    fraction of recovered images and its regime."""
    study = ", ".join(sorted({str(s) for s in df["study"].dropna()})) if "study" in df else ""
    tidy = long.rename(columns={"rho": "sigma"}).merge(
        recovery[[*STATE, "arch", "recovered", "regime"]], on=[*STATE, "arch"], how="left")
    tidy.insert(0, "study", study)
    order = ["study", "dataset", "weights", "arch", "loss", "proxy", "flavour", "score", "sigma", "p", "ci_low",
             "ci_high", "n", "excluded", "recovered", "regime"]
    return tidy[order]


def _markdown(frame: pd.DataFrame, index: bool = True) -> str:
    """A pipe table without the optional ``tabulate`` dependency."""
    header = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for label, row in zip(frame.index, frame.itertuples(index=False), strict=True):
        cells = ([str(label)] if index else []) + [_text(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _text(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def _flavours(df: pd.DataFrame, flavours: Sequence[Flavour]) -> list[Flavour]:
    return [f for f in flavours if proxy_names(df, f)]


def report_data(df: pd.DataFrame, flavours: Sequence[Flavour] = FLAVOURS, *,
                include_uncertified: bool = False) -> dict:
    """Everything the report shows, as plain data: how many attacks recovered their image (the regime),
    Table 1 and Table 3 per flavour (cells of σ_S averaged over architectures, "MSE / SSIM / PSNR /
    LPIPS"), the long σ_S table with p-values and bootstrap intervals, its tidy export, the
    recipe-vs-exact agreement and the findings. ``include_uncertified`` keeps exact values that are not
    certified (λ_min below float64's resolution) in σ_S."""
    if df.empty:
        raise StoreError("no finished jobs in these results; run a study first")
    flavours = _flavours(df, flavours)
    long = pd.concat([spearman_table(df, f, include_uncertified=include_uncertified) for f in flavours],
                     ignore_index=True) if flavours else spearman_table(df.iloc[0:0])
    recovery = recovery_table(df)
    archs = sorted(set(df["arch"]))
    lpips_reasons = sorted({r for r in df.get("lpips_reason", pd.Series(dtype=object)).dropna() if r})
    return {
        "jobs": int(len(df)),
        "archs": archs,
        "images": {f"{d}+{loss_label(lo)}": int(n) for (d, lo), n in
                   df.groupby(["dataset", "loss"])["image_index"].nunique().items()},
        "flavours": flavours,
        "table1": {f: table1(df, f, table=long) for f in flavours},
        "table3": {f: table3(df, f, table=long) for f in flavours},
        "spearman": long,
        "tidy": tidy_table(df, long, recovery),
        "recovery": recovery,
        "agreement": recipe_agreement(df) if set(FLAVOURS) <= set(flavours) else pd.DataFrame(),
        "findings": findings(long, recovery) if flavours else [],
        "lpips_reasons": lpips_reasons,
        "include_uncertified": include_uncertified,
        "excluded": int(long.loc[long["arch"] == MEAN_ARCH, "excluded"].max()) if len(long) else 0,
    }


def format_report(df: pd.DataFrame, fmt: str = "md", *, flavours: Sequence[Flavour] = FLAVOURS,
                  per_arch: bool = False, include_uncertified: bool = False) -> str:
    """The report as Markdown (``md``), CSV (``csv``: the tidy σ_S table, one value per cell; see
    :func:`tidy_table`) or JSON (``json``: everything, including the long σ_S table and the recovery table)."""
    if fmt not in ("md", "csv", "json"):
        raise ConfigError(f"unknown report format {fmt!r}: choose md, csv or json")
    data = report_data(df, flavours, include_uncertified=include_uncertified)
    if fmt == "json":
        frames = ("table1", "table3", "spearman", "agreement", "tidy", "recovery")
        payload = {k: v for k, v in data.items() if k not in frames}
        payload["table1"] = {f: t.to_dict(orient="index") for f, t in data["table1"].items()}
        payload["table3"] = {f: t.to_dict(orient="index") for f, t in data["table3"].items()}
        for name in ("spearman", "agreement", "recovery"):
            payload[name] = _records(data[name])
        return json.dumps(payload, indent=1, ensure_ascii=False)
    if fmt == "csv":
        return data["tidy"].to_csv(index=False)
    lines = [f"# Proxy evaluation: {data['jobs']} jobs, architectures {', '.join(data['archs'])}", "",
             "σ_S is Spearman's correlation over the images of one (dataset, attack loss, architecture), averaged "
             "over the architectures (the paper's evaluation metric). Cells: MSE(↓) / SSIM(↑) / PSNR(↑) / "
             "LPIPS(↓); n/a where undefined. The paper's claim is a positive σ_S with MSE for LAVP (larger proxy, "
             "worse reconstruction), larger than the gradient norm's.",
             "Images per row: " + ", ".join(f"{k} {v}" for k, v in data["images"].items()) + "."]
    if data["lpips_reasons"]:
        lines.append(f"LPIPS unavailable: {data['lpips_reasons'][0]}")
    if data["excluded"] and not data["include_uncertified"]:
        lines.append(f"Exact values that are not certified (λ_min below float64's resolution, shown as ≈ 0) are "
                     f"left out of σ_S: up to {data['excluded']} images in a row (report --include-uncertified "
                     f"keeps them).")
    recovery = data["recovery"]
    several = len(set(recovery["weights"])) > 1
    shown = recovery.assign(row=[row_label(d, w, lo, several) for d, w, lo in
                                 zip(recovery["dataset"], recovery["weights"], recovery["loss"], strict=True)])
    lines += ["", "## Did the attacks leak?", "",
              "recovered: fraction of images whose reconstruction reaches SSIM ≥ 0.5; regime 'failed' below "
              "20 %, where σ_S describe the images' own statistics, not leakage; 'saturated' above 80 %, where "
              "σ_S rank how exactly recovered images were rebuilt, not which images leak.", "",
              _markdown(shown[["row", "arch", "n", "recovered", "median_psnr", "median_ssim", "regime"]],
                        index=False)]
    notices = [f"- {r.row}: {regime_notice(r.recovered)}" for r in shown[shown["arch"] == MEAN_ARCH].itertuples()
               if regime_notice(r.recovered)]
    if notices:
        lines += ["", "Caution:"] + notices
    titles = {"exact": "exact eigenvalues", "paper": "the paper's recipe (finite differences + power iteration)"}
    for flavour in data["flavours"]:
        lines += ["", f"## Table 1: proxies, {titles[flavour]}", "", _markdown(data["table1"][flavour])]
    for flavour in data["flavours"]:
        lines += ["", f"## Table 3: gradient norm vs LAVP fusion, {titles[flavour]}", "",
                  _markdown(data["table3"][flavour])]
    if not data["agreement"].empty:
        agreement = data["agreement"].copy()
        lines += ["", "## Paper recipe vs exact values", "",
                  "rho: σ_S between the two flavours over the images; median_rel_diff: median |paper − exact| / "
                  "|exact|; paper_converged / exact_converged: fraction of values certified within the solver "
                  "tolerance (relative residual; an exact λ_min at float64's resolution, ~1e-16·λ_max, is not).",
                  "",
                  _markdown(agreement, index=False)]
    if data["findings"]:
        lines += ["", "## What the data says", ""] + [f"- {line}" for line in data["findings"]]
    if per_arch:
        long = data["spearman"]
        lines += ["", "## σ_S per architecture (with p-values and 95 % bootstrap intervals)", "",
                  _markdown(long[long["arch"] != MEAN_ARCH], index=False)]
    return "\n".join(lines) + "\n"


def format_rankings(table: pd.DataFrame, fmt: str = "md") -> str:
    """The rankings table (see :func:`rankings`) as Markdown, CSV or JSON."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return json.dumps(_records(table), indent=1, ensure_ascii=False)
    if fmt != "md":
        raise ConfigError(f"unknown report format {fmt!r}: choose md, csv or json")
    lines = []
    for (dataset, arch), group in table.groupby(["dataset", "arch"], sort=True):
        lines += [f"## Rankings on {dataset}, {arch}", "",
                  "Observed: MSE ranking under each attack loss (largest MSE first); predicted: each proxy's "
                  "ranking (largest first). τ: Kendall's τ with the MSE under that loss.", "",
                  _markdown(group.drop(columns=["dataset", "arch"]), index=False), ""]
    return "\n".join(lines)


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


def summarise(summary: StudySummary) -> str:
    """One line describing a finished study run."""
    text = (f"study {summary.name}: {summary.total} jobs; {summary.stored_before} already stored; run now "
            f"{summary.run} ({summary.done} done, {summary.errors} failed"
            + (f", {summary.kept} stored meanwhile by another study" if summary.kept else "")
            + f") in {summary.seconds:.0f} s with {summary.workers} worker(s) x {summary.threads} thread(s)")
    if summary.run:
        text += f", {summary.jobs_per_minute:.2f} jobs/min"
    return text + f"; results in {summary.db}"
