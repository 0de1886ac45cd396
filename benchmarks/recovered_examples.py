"""Example reconstructions around the "recovered" threshold (SSIM >= 0.5), for the README.

Reads finished jobs from one or more study databases, picks for each target SSIM the stored
reconstruction closest to it, and draws truth / reconstruction pairs with their SSIM, PSNR, rel_mse and
pixel correlation into one PNG:

    python benchmarks/recovered_examples.py assets/study/photos-random.sqlite assets/study/photos-training.sqlite \
        --out assets/docs/recovered-examples.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from lavp_core.metrics import RECOVERED_SSIM  # noqa: E402
from lavp_core.study import load_results  # noqa: E402

SCALE = 4
TARGETS = (0.2, 0.35, 0.45, 0.55, 0.7, 0.9)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dbs", nargs="+")
    p.add_argument("--out", default="assets/docs/recovered-examples.png")
    p.add_argument("--targets", default=",".join(str(t) for t in TARGETS))
    args = p.parse_args()
    df = pd.concat([load_results(db, with_images=True) for db in args.dbs], ignore_index=True)
    df = df.dropna(subset=["ssim", "reconstruction_png", "truth_png"])
    chosen = []
    for target in (float(t) for t in args.targets.split(",")):
        if df.empty:
            break
        index = (df["ssim"] - target).abs().idxmin()
        chosen.append(df.loc[index])
        df = df.drop(index)
    chosen.sort(key=lambda r: r["ssim"])
    tiles = []
    for row in chosen:
        truth = Image.open(io.BytesIO(row["truth_png"])).convert("RGB").resize((32 * SCALE, 32 * SCALE), Image.NEAREST)
        recon = Image.open(io.BytesIO(row["reconstruction_png"])).convert("RGB").resize((32 * SCALE, 32 * SCALE),
                                                                                       Image.NEAREST)
        tile = Image.new("RGB", (32 * SCALE * 2 + 6, 32 * SCALE + 58), "white")
        tile.paste(truth, (0, 0))
        tile.paste(recon, (32 * SCALE + 6, 0))
        draw = ImageDraw.Draw(tile)
        verdict = "recovered" if row["ssim"] >= RECOVERED_SSIM else "not recovered"
        draw.text((2, 32 * SCALE + 2), f"SSIM {row['ssim']:.2f}  PSNR {row['psnr']:.1f} dB  {verdict}", fill="black")
        draw.text((2, 32 * SCALE + 16), f"rel_mse {row['rel_mse']:.2f}  corr {row['correlation']:.2f}", fill="black")
        draw.text((2, 32 * SCALE + 30), f"{row['loss']} attack, {row['arch']} {row['weights']}, image "
                                        f"{int(row['image_index'])}", fill="black")
        tiles.append(tile)
    if not tiles:
        print("no finished jobs with images in these databases")
        return 1
    width = sum(t.width for t in tiles) + 10 * (len(tiles) - 1)
    sheet = Image.new("RGB", (width, tiles[0].height), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 10
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"saved {out}: SSIM " + ", ".join(f"{r['ssim']:.2f}" for r in chosen)
          + f" (each pair: ground truth left, reconstruction right; threshold {RECOVERED_SSIM})")
    print(np.round([r["ssim"] for r in chosen], 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
