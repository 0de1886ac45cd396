"""GIFD against Inverting Gradients on the same images, the same model and the same gradient budget.

For each validation image (default: ``photos`` 0-9) the client shares one gradient of the same
random-weight model (default: DLG's sigmoid LeNet, seed 0, known label); both attacks then get the
same number of victim-gradient evaluations (one evaluation = one candidate's weight gradient):

* ``ig``: the Inverting Gradients preset with ``budget / restarts`` steps (plus its final scoring pass);
* ``gifd``: 4 stages (latent + 3 feature stages) of ``budget / (4 restarts) - 1`` steps each, plus
  the scoring pass of each stage.

PSNR / SSIM are computed on de-normalised images clamped to [0, 1]. Prints a markdown table with
one row per image and the means. Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/gifd_vs_ig.py            # photos, 10 images
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/gifd_vs_ig.py --dataset faces   # out of distribution
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from lavp_core.attacks import preset_config, run_attack
from lavp_core.data import load_dataset
from lavp_core.generative import GifdConfig, load_generator, run_gifd
from lavp_core.gradients import client_update
from lavp_core.metrics import score_reconstruction
from lavp_core.models import create_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="photos", help="victim dataset (photos; faces = out of distribution)")
    p.add_argument("--images", default="0-9", help="validation indices, e.g. 0-9 or 0,3,5")
    p.add_argument("--arch", default="lenet", help="victim architecture (random weights)")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the victim's random weights")
    p.add_argument("--budget", type=int, default=2400, help="victim-gradient evaluations per image")
    p.add_argument("--restarts", type=int, default=2, help="restarts of both attacks")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random draws")
    p.add_argument("--strips", default=None, help="folder to save a PNG per image: truth | ig | gifd stages")
    return p.parse_args()


def indices_of(spec: str) -> list[int]:
    if "-" in spec and "," not in spec:
        lo, hi = spec.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in spec.split(",")]


def save_strip(path: Path, images: list[torch.Tensor]) -> None:
    from PIL import Image

    row = torch.cat([torch.nn.functional.pad(x, (1, 1, 1, 1), value=1.0) for x in images], dim=2)  # (3, H, W)
    array = (row.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(array).resize((array.shape[1] * 3, array.shape[0] * 3), Image.NEAREST).save(path)


def main() -> None:
    args = parse_args()
    data = load_dataset(args.dataset, "val")
    info = data.info
    model = create_model(args.arch, info.num_classes, seed=args.model_seed)
    gan = load_generator()
    stages = 4
    ig_config = preset_config("ig", steps=args.budget // args.restarts, restarts=args.restarts)
    gifd_config = GifdConfig(steps=args.budget // (stages * args.restarts) - 1, restarts=args.restarts)
    ig_evals = ig_config.steps * args.restarts + args.restarts  # + the final scoring pass
    strips = Path(args.strips) if args.strips else None
    if strips:
        strips.mkdir(parents=True, exist_ok=True)

    rows = []
    for index in indices_of(args.images):
        image01, label = data[index]
        image = info.normalize(image01).unsqueeze(0)
        update = client_update(model, image, label)
        start = time.perf_counter()
        ig = run_attack(model, update, ig_config, info, generator=torch.Generator().manual_seed(args.seed))
        ig_seconds = time.perf_counter() - start
        start = time.perf_counter()
        gifd = run_gifd(model, update, info, gifd_config, generator=torch.Generator().manual_seed(args.seed),
                        gan=gan)
        gifd_seconds = time.perf_counter() - start
        ig_scores = score_reconstruction(ig.reconstruction, image, info)
        gifd_scores = score_reconstruction(gifd.reconstruction, image, info)
        rows.append({
            "index": index, "ig_psnr": ig_scores["psnr"], "ig_ssim": ig_scores["ssim"],
            "ig_loss": ig.matching_loss, "ig_s": ig_seconds,
            "gifd_psnr": gifd_scores["psnr"], "gifd_ssim": gifd_scores["ssim"],
            "gifd_loss": gifd.matching_loss,
            "gifd_stage": gifd.best_stage, "gifd_s": gifd_seconds, "gifd_evals": gifd.gradient_evaluations,
        })
        r = rows[-1]
        print(f"# image {index}: ig {r['ig_psnr']:.2f} dB / {r['ig_ssim']:.3f} ({ig_seconds:.0f} s), "
              f"gifd {r['gifd_psnr']:.2f} dB / {r['gifd_ssim']:.3f} (stage {r['gifd_stage']}, "
              f"{gifd_seconds:.0f} s)", flush=True)
        if strips:
            save_strip(strips / f"{args.dataset}-{index}.png",
                       [image01, info.denormalize(ig.reconstruction[0]).cpu()]
                       + [s.image01 for s in gifd.stages])

    print()
    print(f"{args.dataset} validation images {args.images}, {args.arch} "
          f"(random weights, seed {args.model_seed}), "
          f"known label; budget per image: ig {ig_evals} victim-gradient evaluations "
          f"({ig_config.steps} steps x {args.restarts} restarts + scoring), gifd {rows[0]['gifd_evals']} "
          f"(4 stages x ({gifd_config.steps} steps + scoring) x {args.restarts} restarts)")
    print()
    print("| image | ig PSNR (dB) | ig SSIM | gifd PSNR (dB) | gifd SSIM | gifd best stage "
          "| ig loss | gifd loss |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['index']} | {r['ig_psnr']:.2f} | {r['ig_ssim']:.3f} | {r['gifd_psnr']:.2f} | "
              f"{r['gifd_ssim']:.3f} | {r['gifd_stage']} | {r['ig_loss']:.1e} | {r['gifd_loss']:.1e} |")

    def mean(key: str) -> float:
        values = [r[key] for r in rows if math.isfinite(r[key])]
        return statistics.fmean(values) if values else math.nan

    print(f"| **mean** | **{mean('ig_psnr'):.2f}** | **{mean('ig_ssim'):.3f}** | "
          f"**{mean('gifd_psnr'):.2f}** | "
          f"**{mean('gifd_ssim'):.3f}** | | {mean('ig_loss'):.1e} | {mean('gifd_loss'):.1e} |")
    print()
    print(f"seconds per image: ig {mean('ig_s'):.0f}, gifd {mean('gifd_s'):.0f}")


if __name__ == "__main__":
    main()
