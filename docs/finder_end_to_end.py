"""What gns costs and saves end to end, measured with the library alone: ``find_batch_size`` as
the README shows it (reference batch ``--ref``, 64), then ``continue_training`` from the
pilot's state at the pick to the target; against the same model trained from scratch at fixed
batch sizes (rates by the same rule; the SGD rule with the finder's noise scale). Every run is
timed by the wall clock, compiles included, and stops at the same target: the mean test
accuracy of the last ``--window`` evaluations, one every ``--eval_every`` examples (8,192).
Prints one JSON object (and writes it to ``--out``).

    python docs/finder_end_to_end.py --optimizer=sgd --seed=0 \
      --data=../shared/data/cifar10-jpeg.tar.gz --out=runs/e2e-sgd-0.json

The model is ``configs/cifar10.py:mlp_sgd``'s (an MLP 3072-512-512-10, no augmentation),
SGD momentum 0.9 at 0.01 or Adam at 1e-3, tuned at batch 64; ``--widths=1024,1024 --augment
--target=0.5`` is ``make demo``'s setup on a CPU (``configs/cifar10.py:demo``). ``--smoke``
runs it on synthetic 8x8 images in seconds (the suite's check).

``--task=lm`` runs ``configs/lm.py:cpu``'s byte-level Transformer (0.47M parameters) on the
standard library's ``.py`` files instead, to a held-out bits per byte at or below ``--target``
(1,024 windows); e.g. ``--task=lm --optimizer=adam --lr=2e-3 --ref=32
--batch_sizes=8,16,32,64,128,256 --target=2.6``. ``--compile_cache DIR`` turns on JAX's
persistent compilation cache there: a second run compiles nothing it compiled before.
"""

import argparse
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the clone's packages

from configs import lm as lm_config  # noqa: E402
from experiments import data, interrupt, models, runlog, tasks  # noqa: E402
from experiments.cli import UserError  # noqa: E402
from gns import scaling  # noqa: E402
from gns.finder import TrainState, continue_training, find_batch_size  # noqa: E402

BASE_LR = {"sgd": 0.01, "adam": 1e-3}


def positive(kind, least=0):
    """An argparse type: a ``kind`` number above ``least`` (finite), else a usage error."""

    def parse(text):
        value = kind(text)
        if not (value > least and math.isfinite(value)):
            raise ValueError(text)
        return value

    parse.__name__ = f"{kind.__name__} > {least}"
    return parse


def batch_sizes(text):
    """An argparse type: comma-separated batch sizes >= 1 (``64,128``)."""
    return [positive(int)(s) for s in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("image", "lm"), default="image")
    p.add_argument("--optimizer", choices=tuple(BASE_LR), default="sgd")
    p.add_argument("--lr", type=positive(float), help="the rate at --ref (0.01 SGD, 1e-3 Adam)")
    p.add_argument("--ref", type=positive(int, 1), default=64, help="the batch of the rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="CIFAR-10 as a folder or .tar.gz (split/class/image.jpg)")
    p.add_argument(
        "--batch_sizes", type=batch_sizes, default="64,128,256,512", help="the fixed runs"
    )
    p.add_argument("--widths", type=batch_sizes, default="512,512", help="the MLP's hidden widths")
    p.add_argument("--augment", action="store_true", help="random crop and flip")
    p.add_argument(
        "--target", type=float, help="test accuracy to reach (0.47); lm: bits per byte, required"
    )
    p.add_argument("--window", type=positive(int), default=3, help="evaluations averaged")
    p.add_argument(
        "--eval_every", type=int, help="examples between evaluations (8,192; 256 with --smoke)"
    )
    p.add_argument("--max_s", type=positive(float), default=150.0, help="wall-clock cap of one run")
    p.add_argument(
        "--run_steps",
        type=positive(int),
        default=7813,
        help="the planned run at --ref (find_batch_size's run_steps): 10 epochs of images at 64",
    )
    p.add_argument("--smoke", action="store_true", help="synthetic 8x8 images, tiny model")
    p.add_argument("--compile_cache", help="JAX's persistent compilation cache in this folder")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.task == "image" and not args.smoke and not args.data:
        p.error("--data is required (or --smoke, or --task=lm)")
    if args.target is not None and not math.isfinite(args.target):
        p.error(f"--target={args.target}: a test accuracy (lm: bits per byte) to reach")
    if args.eval_every is None:
        args.eval_every = 256 if args.smoke else 8192
    if args.eval_every < 1:
        p.error(f"--eval_every={args.eval_every}: the examples between evaluations must be >= 1")
    return args


def setup(args):
    """``(loss_fn, batch_fn, score, params)`` of the setup ``args`` names; ``score``
    is higher-is-better (test accuracy, or minus the held-out bits per byte)."""
    if args.task == "lm":
        return lm_setup(args)
    synthetic = {"image_size": 8, "num_classes": 10, "seed": 0}
    cfg = {"source": "synthetic" if args.smoke else "folder", "path": args.data,
           "cache_dir": None, "name": "cifar10", "tfds_data_dir": None, "num_train": None,
           "num_test": None, "synthetic": synthetic}  # fmt: skip
    ds = data.load(cfg)
    test = data.normalize(ds.test_images[:5000], ds.mean, ds.std), ds.test_labels[:5000]
    widths = (16,) if args.smoke else tuple(args.widths)
    model = models.get_model({"name": "mlp", "widths": widths}, num_classes=10)
    params = model.init(jax.random.key(args.seed), test[0][:1])

    def loss_fn(params, batch):
        logits = model.apply(params, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def batch_fn(size, index):
        return data.train_batch(ds, size, seed=args.seed, augment=args.augment,
                                start_example=index * size)  # fmt: skip

    @jax.jit
    def accuracy(params):
        return jnp.mean(jnp.argmax(model.apply(params, test[0]), -1) == test[1])

    return loss_fn, batch_fn, accuracy, params


def lm_setup(args):
    """:func:`setup` of ``configs/lm.py``'s ``cpu`` (``smoke`` with ``--smoke``) Transformer."""
    config = lm_config.get_config("smoke" if args.smoke else "cpu")
    task = tasks.get(config)
    ds = task.load(config)
    (inputs, targets), n_test = task.keys, 128 if args.smoke else 1024
    test = task.eval_arrays(config, ds, "test", n_test)
    model = models.get_model(config.model)
    params = model.init(jax.random.key(args.seed), test[inputs][:1])

    def loss_fn(params, batch):
        return task.loss(model.apply(params, batch[inputs]), batch[targets]).mean()

    @jax.jit
    def minus_bits(params):
        return -loss_fn(params, test) / math.log(2.0)

    return loss_fn, task.batch_fn(config, ds), minus_bits, params


def say(message: str) -> None:
    """One progress line on stderr (stdout holds the JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def to_target(args, parts, make_opt, state, batch_size, lr) -> dict:
    """Train from ``state`` at ``batch_size`` until the target (or ``--max_s``)."""
    loss_fn, batch_fn, score, _ = parts
    target = -args.target if args.task == "lm" else args.target
    chunk = max(1, args.eval_every // batch_size)
    opt, scores, t0 = make_opt(lr), [], time.perf_counter()
    while time.perf_counter() - t0 < args.max_s:
        state, _ = continue_training(loss_fn, opt, batch_fn, state, chunk, batch_size=batch_size)
        scores.append(float(score(state.params)))
        if len(scores) >= args.window and np.mean(scores[-args.window :]) >= target:
            break
    reached = len(scores) >= args.window and float(np.mean(scores[-args.window :])) >= target
    say(f"batch {batch_size}: {'reached' if reached else 'did not reach'} the target at step "
        f"{int(state.step)}, {time.perf_counter() - t0:.1f} s")  # fmt: skip
    return {"batch_size": batch_size, "learning_rate": lr, "start_step": None, "steps":
            int(state.step), "s": time.perf_counter() - t0, "reached": reached}  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.target is None and args.task == "lm":  # 0.47 is an accuracy, not bits per byte
        print("error: --task=lm needs --target, in bits per byte (e.g. 2.6)", file=sys.stderr)
        sys.exit(2)
    args.target = 0.47 if args.target is None else args.target
    if args.compile_cache:  # a run again on the same shapes compiles nothing (README)
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    parts = setup(args)
    loss_fn, batch_fn, _, params = parts
    lr0, ref, load0 = args.lr or BASE_LR[args.optimizer], args.ref, os.getloadavg()[0]
    make_opt = (lambda r: optax.sgd(r, momentum=0.9)) if args.optimizer == "sgd" else optax.adam
    phases = set()

    def progress(phase, done, total):  # a line as each phase of the finder first starts
        if phase not in phases:
            phases.add(phase)
            say(f"find_batch_size: {phase}")

    result = find_batch_size(loss_fn, params, make_opt(lr0), batch_fn, ref_batch_size=ref,
                             learning_rate=lr0, seed=args.seed, run_steps=args.run_steps,
                             progress=progress)  # fmt: skip
    rec, noise = result.recommendation, float(result.effective_noise_scale.value)
    say(f"pick {rec.batch_size} ({result.basis}); training on from the pilot to the target")
    gns = to_target(args, parts, make_opt, result.state, rec.batch_size, rec.learning_rate)
    gns["start_step"] = int(result.state.step)
    fixed = []
    for b in args.batch_sizes:
        lr = scaling.learning_rate(args.optimizer, lr0, ref, b, noise if noise > 0 else math.inf)
        say(f"batch {b} from scratch to the target")
        scratch = TrainState(params, make_opt(lr[0]).init(params), 0, 0)
        fixed.append(to_target(args, parts, make_opt, scratch, b, lr[0]))
    reached = [r for r in fixed if r["reached"]]
    best = min(reached, key=lambda r: r["s"]) if reached else None
    at_64 = next((r for r in fixed if r["batch_size"] == 64 and r["reached"]), None)
    end_to_end = result.seconds["total"] + gns["s"]
    out = {
        "task": args.task, "optimizer": args.optimizer, "seed": args.seed, "pick": rec.batch_size,
        "basis": result.basis, "noise_scale": noise, "finder_seconds": result.seconds,
        "gns_run": gns, "fixed": fixed, "best_fixed": best and best["batch_size"],
        "overhead_over_run_at_pick": result.seconds["overhead"] / gns["s"],
        "end_to_end_s": end_to_end,
        "end_to_end_over_best": best and end_to_end / best["s"],
        "end_to_end_over_64": at_64 and end_to_end / at_64["s"],
        "load": [load0, os.getloadavg()[0]], "warnings": list(result.warnings),
    }  # fmt: skip
    print(runlog.dumps(out, indent=1))  # strict: nan -> null
    if args.out:
        runlog.write_json(args.out, out)
    return out


def run_main(main_fn) -> None:
    """``main_fn()``, a user error (a bad ``--data``) as one line and exit code 2, Ctrl-C as
    one line and exit code 130."""
    interrupt.install("interrupted: nothing was written; run the command again.")
    try:
        main_fn()
    except UserError as e:
        print(f"error: {e}\nhint: {e.hint}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_main(main)
