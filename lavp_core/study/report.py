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
    findings,
    loss_label,
    recipe_agreement,
    row_order,
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


def _layout(df: pd.DataFrame, flavour: Flavour, proxies: list[str], table: pd.DataFrame | None) -> pd.DataFrame:
    if df.empty or not proxies:
        return pd.DataFrame(columns=proxies)
    table = spearman_table(df, flavour, proxies=proxies) if table is None else table
    mean = table[(table["arch"] == MEAN_ARCH) & (table["flavour"] == flavour)]
    rho = {(r.dataset, r.loss, r.proxy, r.score): r.rho for r in mean.itertuples()}
    rows, labels = [], []
    for dataset, loss in sorted({(d, lo) for d, lo in zip(df["dataset"], df["loss"], strict=True)}, key=row_order):
        labels.append(f"{dataset}+{loss_label(loss)}")
        rows.append([_cell([rho.get((dataset, loss, p, s), math.nan) for s in SCORES]) for p in proxies])
    return pd.DataFrame(rows, index=pd.Index(labels, name="σ_S"), columns=proxies)


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


def report_data(df: pd.DataFrame, flavours: Sequence[Flavour] = FLAVOURS) -> dict:
    """Everything the report shows, as plain data: Table 1 and Table 3 per flavour (cells of σ_S averaged
    over architectures, "MSE / SSIM / PSNR / LPIPS"), the long σ_S table with per-architecture p-values,
    the recipe-vs-exact agreement and the findings."""
    if df.empty:
        raise StoreError("no finished jobs in these results; run a study first")
    flavours = _flavours(df, flavours)
    long = pd.concat([spearman_table(df, f) for f in flavours], ignore_index=True) if flavours else \
        pd.DataFrame(columns=["flavour", "dataset", "loss", "arch", "proxy", "score", "rho", "p", "n"])
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
        "agreement": recipe_agreement(df) if set(FLAVOURS) <= set(flavours) else pd.DataFrame(),
        "findings": findings(long) if flavours else [],
        "lpips_reasons": lpips_reasons,
    }


def format_report(df: pd.DataFrame, fmt: str = "md", *, flavours: Sequence[Flavour] = FLAVOURS,
                  per_arch: bool = False) -> str:
    """The report as Markdown (``md``), CSV (``csv``: the Table 1 and Table 3 layouts stacked, with
    ``table`` and ``flavour`` columns) or JSON (``json``: everything, including the long σ_S table)."""
    if fmt not in ("md", "csv", "json"):
        raise ConfigError(f"unknown report format {fmt!r}: choose md, csv or json")
    data = report_data(df, flavours)
    if fmt == "json":
        payload = {k: v for k, v in data.items() if k not in ("table1", "table3", "spearman", "agreement")}
        payload["table1"] = {f: t.to_dict(orient="index") for f, t in data["table1"].items()}
        payload["table3"] = {f: t.to_dict(orient="index") for f, t in data["table3"].items()}
        payload["spearman"] = _records(data["spearman"])
        payload["agreement"] = _records(data["agreement"])
        return json.dumps(payload, indent=1, ensure_ascii=False)
    if fmt == "csv":
        parts = []
        for name in ("table1", "table3"):
            for flavour, table in data[name].items():
                frame = table.reset_index().rename(columns={"σ_S": "row"})
                frame.insert(0, "flavour", flavour)
                frame.insert(0, "table", name)
                parts.append(frame)
        return pd.concat(parts, ignore_index=True).to_csv(index=False) if parts else ""
    lines = [f"# Proxy evaluation: {data['jobs']} jobs, architectures {', '.join(data['archs'])}", "",
             "σ_S is Spearman's correlation over the images of one (dataset, attack loss, architecture), averaged "
             "over the architectures (the paper's evaluation metric). Cells: MSE(↓) / SSIM(↑) / PSNR(↑) / "
             "LPIPS(↓); n/a where undefined.",
             "Images per row: " + ", ".join(f"{k} {v}" for k, v in data["images"].items()) + "."]
    if data["lpips_reasons"]:
        lines.append(f"LPIPS unavailable: {data['lpips_reasons'][0]}")
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
        lines += ["", "## σ_S per architecture (with p-values)", "",
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
