"""``train-generator``: train the DCGAN generator that the ``gifd`` attack uses as its prior."""

from __future__ import annotations

import argparse
import shlex
import sys

from .base import add_threads_arg, check_seed, command, default_device, print_json


def _configure_train_generator(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="photos", help="bundled 32x32 dataset to learn (default photos)")
    p.add_argument("--epochs", type=int, default=64, help="passes over the training crops (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="crops per step (default 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4)")
    p.add_argument("--latent-dim", type=int, default=64, help="size of the latent code (default 64)")
    p.add_argument("--width", type=int, default=32,
                   help="channel width of the last hidden layer (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--out", default="assets/generator/dcgan-photos.pt",
                   help="checkpoint to write; a .json with the command and hash is written beside it")
    p.add_argument("--resume", action="store_true", help="continue from the last finished epoch")
    p.add_argument("--checkpoint", default=None,
                   help="per-epoch training state (default tmp/train-generator/<out name>.resume.pt)")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="hide the progress bar")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_threads_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("train-generator", "train the small DCGAN generator used by the gifd attack (CPU: about 15 min)",
         _configure_train_generator)
def train_generator_command(args) -> int:
    from ..train_generator import GeneratorTrainConfig, train_generator

    config = GeneratorTrainConfig(dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                                  lr=args.lr, latent_dim=args.latent_dim, width=args.width, seed=check_seed(args.seed))
    words = [a for a in sys.argv[1:] if a not in ("--resume", "--no-progress", "--quiet", "--json")]
    summary = train_generator(config, args.out, resume=args.resume, resume_path=args.checkpoint,
                              command=shlex.join(["python", "-m", "lavp_core", *words]),
                              device=default_device(args.device), progress=not args.no_progress)
    last_d, last_g = summary.curve[-1] if summary.curve else (float("nan"), float("nan"))
    if args.json:
        print_json({"out": str(summary.out), "metadata": str(summary.metadata), "epochs": summary.epochs,
                    "seconds": summary.seconds, "sha256": summary.sha256,
                    "final_discriminator_loss": last_d, "final_generator_loss": last_g})
        return 0
    print(f"wrote {summary.out} (sha256 {summary.sha256[:16]}…) and {summary.metadata}")
    print(f"{summary.epochs} epochs in {summary.seconds:.0f} s; last epoch: D loss {last_d:.3f}, "
          f"G loss {last_g:.3f}")
    return 0
