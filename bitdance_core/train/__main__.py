"""python -m bitdance_core.train [--seed S] [--out DIR] [--only tokenizer|classcond|t2i] [--eval K]"""
from __future__ import annotations

import argparse
import os
import time

import torch

from ..pipelines.tokenizers import load_autoencoder
from .common import save_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitdance_core.train", description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(__file__)), "demo_models"),
                    help="writes OUT/digits-imagenet and OUT/digits-t2i (default: the shipped demo models)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["tokenizer", "classcond", "t2i"], default=None,
                    help="one part (classcond / t2i reuse the tokenizer in OUT/digits-t2i)")
    ap.add_argument("--threads", type=int, default=2, choices=[1, 2],
                    help="torch threads (on a busy shared machine 1 is often faster than 2)")
    ap.add_argument("--tokenizer-steps", type=int, default=800)
    ap.add_argument("--classcond-steps", type=int, default=2000)
    ap.add_argument("--t2i-steps", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=20, metavar="K", help="then draw K digits per class and score them (0: skip)")
    args = ap.parse_args(argv)

    from .classcond import train_classcond
    from .text2image import train_t2i
    from .tokenizer import train_tokenizer

    t2i_dir, cc_dir = os.path.join(args.out, "digits-t2i"), os.path.join(args.out, "digits-imagenet")
    t0 = time.time()
    if args.only in (None, "tokenizer"):
        ae = train_tokenizer(t2i_dir, seed=args.seed, steps=args.tokenizer_steps, threads=args.threads)
    else:
        ae = load_autoencoder(t2i_dir)
    ae.requires_grad_(False).eval()
    if args.only in (None, "classcond"):
        train_classcond(cc_dir, ae, seed=args.seed, steps=args.classcond_steps, threads=args.threads)
    if args.only in (None, "t2i"):
        train_t2i(t2i_dir, ae, seed=args.seed, steps=args.t2i_steps, threads=args.threads)
    print(f"[train] done in {time.time() - t0:.0f} s", flush=True)
    if args.eval:
        report(args.out, args.eval, args.only)
    return 0


def report(out: str, per_class: int, only: str | None) -> None:
    """Scores the models in OUT the way tests/test_demo.py does (seed 0, the demo defaults)."""
    from ..cli.demo import generate_digits
    from . import data
    from .evaluate import describe, recognition
    from .tokenizer import roundtrip_psnr

    models = {"classcond": os.path.join(out, "digits-imagenet", "model.pt"), "t2i": os.path.join(out, "digits-t2i")}
    clf = data.digit_classifier()
    metrics = {}
    images, labels = data.load_digits_8x8()
    _, (held, _) = data.split(images, labels)
    ae = load_autoencoder(models["t2i"])
    metrics["psnr_heldout_db"] = round(roundtrip_psnr(ae, data.to_pixels(torch.from_numpy(held))), 2)
    print(f"[eval] tokenizer round-trip PSNR on {len(held)} held-out digits: {metrics['psnr_heldout_db']} dB")
    for name, path in models.items():
        if only not in (None, name):
            continue
        t = time.time()
        px = generate_digits(name == "t2i", per_class, seed=0, model=path)
        r = recognition(px, per_class, clf)
        metrics[name] = {"overall": r["overall"], "worst": r["worst"], "per_class": r["per_class"],
                         "per_class_images": per_class, "generate_seconds": round(time.time() - t, 1)}
        print(f"[eval] {name}: {describe(r)} ({time.time() - t:.1f} s for {10 * per_class} images)")
    save_json(os.path.join(out, "metrics.json"), metrics)


if __name__ == "__main__":
    raise SystemExit(main())
