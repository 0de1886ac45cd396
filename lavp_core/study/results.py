"""Reading a study's results: the stored jobs as one DataFrame with a column per (flavour, proxy), the
names of those columns, and the check that the rows come from one study configuration."""

from __future__ import annotations

import os

import pandas as pd

from ..errors import ConfigError
from ..metrics import RECOVERED_SSIM
from ..store import open_store
from .plan import FLAVOURS, Flavour

CELL = ["dataset", "loss", "arch", "weights", "image_index"]  # one job per cell in the results of one configuration


def proxy_column(proxy: str, flavour: Flavour = "exact") -> str:
    """Name of a proxy's value column in :func:`load_results`: ``proxy_column("l2_min", "paper") ==
    "paper_l2_min"``."""
    if flavour not in FLAVOURS:
        raise ConfigError(f"unknown proxy flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    return f"{flavour}_{proxy}"


def proxy_names(df: pd.DataFrame, flavour: Flavour = "exact") -> list[str]:
    """Proxies with a value column of ``flavour`` in ``df``, in the proxy table's order
    (:func:`lavp_core.proxies.proxy_order`), then the rest by name."""
    from ..proxies import proxy_order

    prefix = f"{flavour}_"
    found = [c[len(prefix):] for c in df.columns
             if c.startswith(prefix) and not c.endswith("_converged") and not c.endswith("_method")]
    return proxy_order(sorted(found))


def load_results(db: str | os.PathLike, *, study: str | None = None, include_errors: bool = False,
                 with_images: bool = False) -> pd.DataFrame:
    """The stored jobs as one DataFrame (read-only; works while a study writes).

    One row per job: identity columns (``dataset``, ``split``, ``image_index``, ``arch``, ``weights``,
    ``loss``, ``preset`` …), ``status``/``error``, the scores ``mse``, ``psnr``, ``ssim``, ``rel_mse``,
    ``correlation``, ``lpips`` (NaN where not computed, with ``lpips_reason``), ``recovered`` (SSIM at
    least :data:`~lavp_core.metrics.RECOVERED_SSIM`), ``matching_loss``, timings, and for every proxy and
    flavour the value column ``{flavour}_{proxy}`` (see :func:`proxy_column`) and a boolean
    ``{flavour}_{proxy}_converged``. ``study`` keeps only that study's jobs; ``include_errors`` keeps
    failed jobs; ``with_images`` adds the PNG bytes ``reconstruction_png`` and ``truth_png``.
    """
    with open_store(db, readonly=True) as store:
        rows = store.job_rows(study=study, status=None if include_errors else "done", with_images=with_images)
        proxies = store.proxy_rows([r["job_key"] for r in rows]) if rows else []
    return _frame(rows, proxies)


def _frame(rows: list[dict], proxies: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for column in ("mse", "psnr", "ssim", "rel_mse", "correlation", "lpips", "matching_loss", "attack_seconds",
                   "proxy_exact_seconds", "proxy_paper_seconds", "job_seconds"):
        if column in df:
            df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    if "ssim" in df:  # derived, not stored: the criterion is the code's (metrics.RECOVERED_SSIM), not the row's
        df["recovered"] = df["ssim"] >= RECOVERED_SSIM
    if proxies:
        long = pd.DataFrame(proxies)
        long["value"] = pd.to_numeric(long["value"], errors="coerce").astype(float)
        long["column"] = long["flavour"] + "_" + long["proxy"]
        values = long.pivot(index="job_key", columns="column", values="value")
        converged = long.pivot(index="job_key", columns="column", values="converged")
        converged = converged.astype(float).fillna(0).astype(bool).add_suffix("_converged")
        df = df.join(values, on="job_key").join(converged, on="job_key")
    return df


def check_one_configuration(df: pd.DataFrame) -> None:
    """Refuse results in which one image was attacked more than once with the same loss on the same
    architecture (jobs of several study configurations, e.g. two step counts, in one database):
    correlations and rankings over them would count that image twice or pick one at random."""
    cell = [c for c in CELL if c in df.columns]  # ``weights`` may be absent from a hand-made table
    if df.empty or not set(CELL) - {"weights"} <= set(cell):
        return
    repeated = df[df.duplicated(cell, keep=False)]
    if repeated.empty:
        return
    first = repeated.iloc[0]
    studies = sorted({str(v) for v in repeated.get("study", pd.Series(dtype=str)).dropna()})
    raise ConfigError(f"{repeated.groupby(cell).ngroups} (image, architecture, weights, loss) cells have results "
                      f"from more than one configuration (e.g. image {int(first['image_index'])} on "
                      f"{first['arch']} with {first['loss']}); studies involved: "
                      f"{', '.join(studies) or 'unnamed'}. Read one study (--study NAME) or keep each "
                      f"configuration in its own database")
