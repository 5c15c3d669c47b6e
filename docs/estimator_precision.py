"""How much noisier the noise statistics are from 8 microbatch gradients than from the
per-example norms of the same batches: the measurement behind ``gns.ghost.MICROBATCH_PRICE``.

Trains ``--steps`` Adam steps at batch 64, then, at those parameters, takes ``--n`` independent
batches of ``--batch`` and computes on each batch both ``estimate.per_example`` and
``estimate.microbatch`` (8 microbatches). Prints one JSON object: the means and standard
deviations of each estimator's ``g_sq`` and ``trace_cov`` over the batches, and the ratio of
the microbatch estimator's variance over the per-example one's. The noise scale's relative
variance is about the sum of the two statistics' relative variances, so the ratio on the one
with the larger relative variance (``g_sq`` below the noise scale) is what more steps cost.

    python docs/estimator_precision.py --model=cnn --batch=128 \
      --data=../shared/data/cifar10-jpeg.tar.gz
    python docs/estimator_precision.py --task=lm --batch=32 --steps=200

The CNN is ``make bench``'s SmallCNN; ``--task=lm`` is ``configs/lm.py:cpu``'s Transformer
(``docs/finder_end_to_end.py``'s ``setup``). ``--smoke`` runs on synthetic 8x8 images in
seconds (the suite's check).
"""

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the clone's packages

import finder_end_to_end as e2e  # noqa: E402  (the script beside this one)

from experiments import models, runlog  # noqa: E402
from gns import estimate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("image", "lm"), default="image")
    p.add_argument("--model", choices=("cnn", "mlp"), default="cnn", help="image task's model")
    p.add_argument("--data", help="CIFAR-10 as a folder or .tar.gz (split/class/image.jpg)")
    p.add_argument("--batch", type=int, default=128, help="the measured batch (multiple of 8)")
    p.add_argument(
        "--steps", type=e2e.positive(int, -1), default=300, help="Adam steps at batch 64 first"
    )
    p.add_argument(
        "--n", type=e2e.positive(int, 1), default=80, help="independent batches measured (>= 2)"
    )
    p.add_argument("--smoke", action="store_true", help="synthetic 8x8 images, tiny model")
    args = p.parse_args(argv)
    if args.task == "image" and not args.smoke and not args.data:
        p.error("--data is required (or --smoke, or --task=lm)")
    if args.batch % 8 or args.batch <= 8:
        p.error(f"--batch={args.batch}: pass a multiple of 8 above 8 (8 microbatches)")
    return args


def setup(args):
    """``(loss_fn, batch_fn, params)`` of the setup ``args`` names."""
    flags = ["--task=lm"] if args.task == "lm" else [f"--data={args.data}", "--augment"]
    loss_fn, batch_fn, _, params = e2e.setup(e2e.parse_args(flags + ["--smoke"] * args.smoke))
    if args.task == "lm" or args.model == "mlp":
        return loss_fn, batch_fn, params
    widths = (8,) if args.smoke else (32, 64, 128)
    model = models.get_model({"name": "small_cnn", "widths": widths, "groups": 8}, num_classes=10)

    def cnn_loss(params, batch):
        logits = model.apply(params, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    return cnn_loss, batch_fn, model.init(jax.random.key(0), batch_fn(1, 0)["image"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    loss_fn, batch_fn, params = setup(args)
    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, batch):
        updates, opt_state = opt.update(jax.grad(loss_fn)(params, batch), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    e2e.say(f"training {args.steps} steps, then measuring {args.n} batches of {args.batch}")
    for s in range(args.steps):
        params, opt_state = step(params, opt_state, batch_fn(64, s))

    @jax.jit
    def both(params, batch):
        exact, _ = estimate.per_example(loss_fn, params, batch, method="ghost")
        sampled, _ = estimate.microbatch(loss_fn, params, batch, num_microbatches=8)
        return [exact.g_sq, exact.trace_cov, sampled.g_sq, sampled.trace_cov]

    start = 10**6 // args.batch  # batches the training above did not see
    rows = np.array([both(params, batch_fn(args.batch, start + i)) for i in range(args.n)])
    mean, sd = rows.mean(0), rows.std(0, ddof=1)
    names = ("g_sq", "trace_cov")
    out = {
        "task": args.task, "model": args.model if args.task == "image" else "transformer",
        "batch": args.batch, "n": args.n,
        "per_example": {k: {"mean": mean[i], "sd": sd[i]} for i, k in enumerate(names)},
        "microbatch": {k: {"mean": mean[i + 2], "sd": sd[i + 2]} for i, k in enumerate(names)},
        "variance_ratio": {k: (sd[i + 2] / sd[i]) ** 2 for i, k in enumerate(names)},
    }  # fmt: skip
    out = json.loads(runlog.dumps(out, default=float))  # strict: nan -> null
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    e2e.run_main(main)
