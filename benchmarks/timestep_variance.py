"""Variance of the per-batch estimate of the negative ELBO at equal compute (one timestep per example),
for three ways of choosing timesteps, on a trained model:

- per-example uniform t (pyrodiff's default);
- importance-sampled t, p(t) proportional to sqrt(E[l_t^2]) (Nichol & Dhariwal 2021), warmed on draws
  of the training data's terms;
- one index set shared by the whole batch, the choice a subsampled ``pyro.plate`` over time makes.

    python benchmarks/timestep_variance.py CHECKPOINT [--batches 200] [--batch-size 64]

All three are unbiased; the script prints their means, standard deviations and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys

PROG = "timestep_variance"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warm-examples", type=int, default=64)
    return p


if __name__ == "__main__":  # refuse bad arguments before torch and Pyro load (seconds)
    build_parser().parse_args()

import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import TraceMeanField_ELBO  # noqa: E402
from pyro.poutine.messenger import Messenger  # noqa: E402

from pyrodiff.chain.importance import ImportanceSampler  # noqa: E402
from pyrodiff.chain.timesteps import _Subsample  # noqa: E402
from pyrodiff.evaluation.bound import bound_terms  # noqa: E402
from pyrodiff.refusal import run_refusing  # noqa: E402
from pyrodiff.training.trained import load_trained  # noqa: E402


class SharedTimesteps(Messenger):
    """Replaces the per-example draw of the site ``"t"`` by one timestep shared by the whole batch."""

    def _process_message(self, msg):
        if msg["name"] == "t":
            fn = msg["fn"]
            msg["fn"] = _SharedSubsample(fn.num_examples, fn.subsample_size, fn.size, fn.device)


class _SharedSubsample(_Subsample):
    def sample(self, sample_shape=torch.Size()):
        return torch.randint(1, self.size + 1, (self.subsample_size, 1), device=self.device).expand(
            -1, self.num_examples
        )


_SharedSubsample.__name__ = "_Subsample"  # recognised and pruned by Pyro as a subsample site


def run(args: argparse.Namespace) -> int:
    if min(args.batches, args.batch_size, args.warm_examples) < 2:
        raise ValueError("--batches, --batch-size and --warm-examples must be at least 2")
    built, model = load_trained(args.checkpoint)
    guide = built.guide
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    data = built.data.test
    T = built.schedule.num_steps
    # warm the importance sampler with draws of every term on training examples
    sampler = ImportanceSampler(T, history=10)
    warm = bound_terms(model, built.data.train[: args.warm_examples], num_samples=1).nats[0]  # (N, T + 1)
    for i in range(sampler.history):
        sampler.update(torch.arange(1, T + 1), warm[i % len(warm), :T])
    elbo = TraceMeanField_ELBO()
    choices = {
        "per-example uniform t": (model, guide),
        "importance-sampled t": (sampler(model), sampler(guide)),
        "shared plate subsample": (SharedTimesteps()(model), SharedTimesteps()(guide)),
    }
    results = {name: [] for name in choices}
    with torch.no_grad():
        for _ in range(args.batches):
            x0 = data[torch.randint(len(data), (args.batch_size,))]
            for name, (m, g) in choices.items():
                results[name].append(elbo.loss(m, g, x0, 1) / args.batch_size)
    base = statistics.stdev(results["per-example uniform t"])
    print(f"{built.spec.name}: {args.batches} batches of {args.batch_size}, one timestep per example, T = {T}")
    print("  (mean and standard deviation of the per-batch estimate of -ELBO, nats/example)")
    for name, values in results.items():
        sd = statistics.stdev(values)
        print(
            f"  {name:24s} mean {statistics.mean(values):10.3f}   sd {sd:10.3f}   sd ratio to uniform {sd / base:7.3f}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_refusing(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
