r"""A variational autoencoder with a *learned* encoder, written as an ordinary Pyro model/guide pair: the
baseline for "a diffusion model is a hierarchical VAE whose encoder has no parameters".

Model :math:`p_\theta` and guide :math:`q_\phi`, for data :math:`x` of shape ``data_shape`` (D values on the
grid of ``levels`` grey levels in [-1, 1]) and a latent :math:`z \in \mathbb{R}^{d_z}`:

- prior :math:`p(z) = N(0, I_{d_z})`;
- decoder :math:`p_\theta(x \mid z) = \prod_d \mathrm{DG}(x_d;\ \mu_{\theta,d}(z), \sigma_{\theta,d}(z))`, the *same*
  discretized Gaussian (Ho et al. 2020, eq. 13; :class:`~pyrodiff.chain.decoders.DiscretizedGaussian`) that scores
  the data in the diffusion model, with mean and scale per pixel from the decoder network;
- encoder :math:`q_\phi(z \mid x) = N(m_\phi(x), \mathrm{diag}\, s_\phi(x)^2)`.

Both networks are MLPs (``depth`` hidden SiLU layers of width ``hidden``); the raw outputs are split in halves,
``[loc, raw scale]``, and a scale is :math:`\mathrm{softplus}(\text{raw}) + \text{floor}` (floors
:data:`ENCODER_MIN_SCALE`, :data:`DECODER_MIN_SCALE`).

The negative ELBO of one example is :math:`L_0 + L_1` with :math:`L_0 = -E_{q_\phi(z \mid x)} \log p_\theta(x \mid z)`
(distortion) and :math:`L_1 = \mathrm{KL}(q_\phi(z \mid x) \,\|\, N(0, I))` (rate): the diffusion bound's term layout
with T = 1 and :math:`z` in the place of :math:`x_1`, except that :math:`q(z \mid x)` is learned instead of fixed.
:func:`negative_elbo` returns it as :class:`~pyrodiff.evaluation.bound.BoundTerms` (L_1 analytic, L_0 at draws of z), so
bits/dim, standard errors and :func:`pyrodiff.evaluation.report.summarise` work as for the diffusion bound.
Training (:func:`train_vae`) runs the training stage's optimisation loop
(:class:`~pyrodiff.training.optimisation.OptimisationLoop`, the diffusion model's too) on Pyro's ELBO for a
wall-clock budget, with early stopping on examples held out of the training data.  The mathematics (what is exact and what is estimated) is docs/MATH.md, section 15,
"The learned-encoder VAE".
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import checks
from ..chain.decoders import DiscretizedDecoder, DiscretizedGaussian, parse_decoder
from ..chain.forward import check_batch
from ..chain.gaussian import normal_kl
from ..chain.objectives import parse_estimator
from ..evaluation.bound import BoundTerms
from ..training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..training.graphed import elbo_on_device
from ..training.optimisation import OptimisationLoop

__all__ = ["VAE", "train_vae", "negative_elbo", "save_vae", "load_vae", "parameter_count"]

#: Floor of the encoder's scale :math:`s_\phi = \mathrm{softplus}(\cdot) + 10^{-4}` (keeps :math:`\log s` finite).
ENCODER_MIN_SCALE = 1e-4
#: Floor of the decoder's scale :math:`\sigma_\theta = \mathrm{softplus}(\cdot) + 10^{-3}`, far below the half-bin
#: 1/(levels - 1) of any grid in use (1/16 for digits), so a pixel's probability can still reach 1.
DECODER_MIN_SCALE = 1e-3
#: ``spec["kind"]`` of a VAE checkpoint (a diffusion checkpoint's specification has no ``kind``).
CHECKPOINT_KIND = "vae"
#: :func:`train_vae` reads its losses on the host every this many steps (and at each evaluation and at the end).
LOG_EVERY = 50


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers through ``widths`` with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def _widths(inputs: int, hidden: int, depth: int, outputs: int) -> list[int]:
    return [inputs] + [hidden] * depth + [outputs]


def parameter_count(data_shape: Sequence[int], latent_dim: int = 32, hidden: int = 512, depth: int = 2) -> int:
    r"""Number of parameters of ``VAE(data_shape, latent_dim, hidden, depth)``, in closed form: an MLP through
    widths :math:`w_0, \dots, w_K` has :math:`\sum_k (w_k + 1)\, w_{k+1}` (weights and biases); the encoder runs
    :math:`D \to H^{\times \text{depth}} \to 2 d_z`, the decoder :math:`d_z \to H^{\times \text{depth}} \to 2D`."""
    D = math.prod(data_shape)

    def mlp(widths: list[int]) -> int:
        return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))

    return mlp(_widths(D, hidden, depth, 2 * latent_dim)) + mlp(_widths(latent_dim, hidden, depth, 2 * D))


class VAE(nn.Module):
    r"""A Gaussian-latent VAE with the discretized decoder on ``levels`` grey levels (module docstring).

    :param data_shape: shape of one example, e.g. ``(1, 8, 8)``.
    :param latent_dim: :math:`d_z`, the dimension of :math:`z`.
    :param hidden: width of the hidden layers of both MLPs.
    :param depth: number of hidden layers of each MLP (0: both are affine maps).
    :param levels: number of grey levels of the data's grid in [-1, 1].

    The defaults are the digits comparison: 8x8 images with 17 levels; :math:`d_z` = 32, two hidden layers of 512
    units, 673,984 parameters (the digits U-Net has 701,345).

    ``model(x)`` and ``guide(x)`` are Pyro programs with sample sites ``"z"`` (in ``pyro.plate("data")``)
    and the observed ``"x"``; train them with ``pyro.infer.SVI`` and ``Trace_ELBO`` or
    ``TraceMeanField_ELBO`` (:func:`train_vae`).
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 32,
        hidden: int = 512,
        depth: int = 2,
        levels: int = 17,
    ) -> None:
        super().__init__()
        if not isinstance(data_shape, Sequence) or len(data_shape) == 0:
            raise TypeError(f"data_shape must be a non-empty sequence of positive integers, got {data_shape!r}")
        self.data_shape = tuple(checks.positive_int("every entry of data_shape", n) for n in data_shape)
        self.latent_dim = checks.positive_int("latent_dim", latent_dim)
        self.hidden = checks.positive_int("hidden", hidden)
        self.depth = checks.integer("depth", depth, 0)
        #: the law of x given the decoder's outputs: its grid check, reconstructions and units
        self.observation: DiscretizedDecoder = parse_decoder("discretized", levels)
        D = math.prod(self.data_shape)
        self.encoder = _mlp(_widths(D, hidden, depth, 2 * latent_dim))
        self.decoder = _mlp(_widths(latent_dim, hidden, depth, 2 * D))

    @property
    def levels(self) -> int:
        return self.observation.levels

    @property
    def dims(self) -> int:
        """D, the number of values in one example."""
        return math.prod(self.data_shape)

    @property
    def config(self) -> dict:
        """The constructor's arguments as plain data: ``VAE(**vae.config)`` builds the same architecture."""
        return {
            "data_shape": list(self.data_shape),
            "latent_dim": self.latent_dim,
            "hidden": self.hidden,
            "depth": self.depth,
            "levels": self.levels,
        }

    def describe(self) -> dict:
        """The model's choices as plain data (recorded in reports, as :meth:`DiffusionModel.describe` is)."""
        return {
            "kind": CHECKPOINT_KIND,
            **self.config,
            "decoder": self.observation.name,
            "parameters": sum(p.numel() for p in self.parameters()),
        }

    # ------------------------------------------------------------------ the two networks
    def _check_parameters(self, x: torch.Tensor) -> None:
        p = next(self.parameters())
        if p.dtype != x.dtype:
            raise TypeError(f"data of dtype {x.dtype} does not match the VAE's {p.dtype}: convert one to the other")
        if p.device != x.device:
            raise ValueError(f"data on {x.device} but the VAE is on {p.device}: move one to the other")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean :math:`m_\phi(x)` and scale :math:`s_\phi(x)` of :math:`q_\phi(z \mid x)`, each ``(N, latent_dim)``."""
        self._check_parameters(x)
        loc, raw = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
        return loc, F.softplus(raw) + ENCODER_MIN_SCALE

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean :math:`\mu_\theta(z)` and scale :math:`\sigma_\theta(z)` of the discretized decoder, each
        ``(N, *data_shape)``, for latents ``z`` of shape ``(N, latent_dim)``."""
        self._check_parameters(z)
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        loc, raw = self.decoder(z).chunk(2, dim=-1)
        shape = (z.shape[0],) + self.data_shape
        return loc.reshape(shape), (F.softplus(raw) + DECODER_MIN_SCALE).reshape(shape)

    def likelihood(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`p_\theta(x \mid z)` given the decoder's outputs: ``DiscretizedGaussian(loc, scale, levels)`` with the
        data dims as its event."""
        return DiscretizedGaussian(loc, scale, self.levels).to_event(len(self.data_shape))

    def check_data(self, x: torch.Tensor) -> None:
        """Refuse what is not a floating batch ``(N, *data_shape)``; while Pyro's validation is enabled (the
        default; it reads the values, a device synchronisation on a GPU), also non-finite data and data off the
        grid of ``levels`` values.  :func:`train_vae` checks the training set once and trains with it off."""
        check_batch(x)
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"data of shape {tuple(x.shape[1:])} does not fit the VAE's data shape {self.data_shape}")
        if dist.is_validation_enabled():
            self.observation.check(x)

    # ------------------------------------------------------------------ the Pyro programs
    def model(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`z \sim N(0, I)`, then :math:`x \sim p_\theta(x \mid z)`, observed."""
        self.check_data(x)
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            zeros = x.new_zeros(x.shape[0], self.latent_dim)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            return pyro.sample("x", self.likelihood(*self.decode(z)), obs=x)

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`z \sim q_\phi(z \mid x)`."""
        self.check_data(x)
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encode(x)
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


# ---------------------------------------------------------------------- the bound
@torch.no_grad()
def negative_elbo(
    vae: VAE, x: torch.Tensor, num_samples: int = 1, *, generator: torch.Generator | None = None
) -> BoundTerms:
    r"""Draws of the negative ELBO's two terms for each example, as :class:`~pyrodiff.evaluation.bound.BoundTerms` with
    ``nats`` of shape ``(S, N, 2)``:

    - column 0, :math:`L_0 = -\log p_\theta(x \mid z_s)` at a draw :math:`z_s \sim q_\phi(z \mid x)` (an unbiased
      estimate of the distortion :math:`-E_q \log p_\theta(x \mid z)`);
    - column 1, :math:`L_1 = \mathrm{KL}(q_\phi(z \mid x) \,\|\, N(0, I)) = \tfrac12 \sum_k (m_k^2 + s_k^2 - 1 - \log s_k^2)`, exact.

    ``.total`` is the negative ELBO per draw and example (nats), ``.total_stderr()`` its standard error across
    examples, ``.bits_per_dim`` divides by :math:`D \ln 2`; ``x0_sq_error`` holds the squared error of the
    decoder's mean (clipped to [-1, 1]) at :math:`z_s`.  ``generator`` draws the :math:`z_s` (default: torch's).
    """
    checks.positive_int("num_samples", num_samples)
    vae.check_data(x)
    N, event = x.shape[0], tuple(range(1, x.dim()))
    loc_q, scale_q = vae.encode(x)
    nats = x.new_empty(num_samples, N, 2)
    sq_error = x.new_empty(num_samples, N, 1)
    nats[:, :, 1] = normal_kl(loc_q, scale_q**2, torch.zeros_like(loc_q), torch.ones_like(loc_q), 1)
    for s in range(num_samples):
        noise = torch.randn(loc_q.shape, generator=generator, dtype=x.dtype, device=_noise_device(generator, x))
        loc, scale = vae.decode(loc_q + scale_q * noise.to(x.device))
        nats[s, :, 0] = -vae.likelihood(loc, scale).log_prob(x)
        sq_error[s, :, 0] = (vae.observation.reconstruction(loc) - x).pow(2).sum(event)
    if not torch.isfinite(nats).all():
        bad = "L_0 (decoder)" if not torch.isfinite(nats[..., 0]).all() else "L_1 (KL to the prior)"
        raise FloatingPointError(f"the term {bad} of the VAE's bound is not finite (broken weights or data?)")
    return BoundTerms(nats, sq_error, vae.dims, vae.observation, vae.describe())


def _noise_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    """Where ``generator`` draws (the data's device when there is none)."""
    return x.device if generator is None else generator.device


# ---------------------------------------------------------------------- training
class _VAETraining(OptimisationLoop):
    """The training stage's optimisation of a VAE's ELBO (``elbo``, made to keep its loss on the device by
    :func:`~pyrodiff.training.graphed.elbo_on_device`): Adam, the linear warm-up, no clipping and no EMA."""

    def __init__(self, vae: VAE, elbo: pyro.infer.ELBO, lr: float, warmup_steps: int) -> None:
        parameters = list(vae.parameters())
        super().__init__([{"params": parameters}], lr=lr, warmup_steps=warmup_steps, device=parameters[0].device)
        self.loss_module = elbo_on_device(elbo)(vae.model, vae.guide)

    def step_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Back-propagate the batch's negative ELBO (summed over examples, as ``SVI`` does); record it per example."""
        loss = self.loss_module(batch)
        loss.backward()
        return loss.detach() / batch.shape[0]


def train_vae(
    data: torch.Tensor,
    seconds: float,
    *,
    vae: VAE | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 100,
    estimator: str = "mean_field",
    validation_fraction: float = 0.1,
    eval_every: int = 100,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[VAE, dict]:
    r"""Train a VAE on ``data`` ``(N, *data_shape)`` on Pyro's ELBO for ``seconds`` of wall clock (the clock is
    read once per step; also stop after ``max_steps`` steps if given), keeping the weights that are best on held-out
    training data.

    ``vae``: the VAE to train in place (on the data's device and dtype); by default ``VAE(data_shape)``,
    initialised from ``seed``.  Each step is one step of the training stage's
    :class:`~pyrodiff.training.optimisation.OptimisationLoop` on the ELBO module ``elbo(vae.model, vae.guide)`` of a
    batch of ``batch_size`` examples (a fresh random permutation of the training examples every epoch): Adam (AdamW
    without weight decay) at learning rate ``lr``, warmed up linearly over ``warmup_steps`` steps, no clipping, no
    EMA; the loss stays on the device and is read every :data:`LOG_EVERY` steps, at each evaluation and at the end (a
    non-finite one stops training, naming its step).  ``estimator``: ``"mean_field"``
    (``TraceMeanField_ELBO``, the KL to the prior in closed form; unbiased here, the prior of :math:`z` having no
    parents) or ``"trace"`` (``Trace_ELBO``).  The parameters live in a param store of their own for the run
    (Pyro's global store is left as it was).

    Early stopping: a random ``validation_fraction`` of ``data`` (at least one example) is held out and never
    trained on; every ``eval_every`` steps and at the end, the mean negative ELBO of the held-out examples is
    estimated (:func:`negative_elbo`, one draw of :math:`z` per example, the same draws at every evaluation so
    that evaluations compare without that noise), and the weights of the best evaluation are returned.  A
    VAE of this size overfits the 1,437 digits within a few thousand steps, so without this a longer budget
    gives a worse test bound.  ``validation_fraction=0`` trains on every example and returns the last weights.
    The evaluations count against the time budget.  The same seed gives the same weights after the same
    number of steps.

    Returns the VAE (in evaluation mode) and ``info``: ``steps``, ``seconds``, ``steps_per_second``,
    ``stopped_by`` (``"time"`` or ``"max_steps"``), ``losses`` (the loss of each step in nats per example,
    an unbiased estimate of the batch's mean negative ELBO), ``validation`` (``[step, nats]`` of each
    evaluation), ``best_step`` (the step of the returned weights), ``validation_indices`` (the held-out rows
    of ``data``) and the hyperparameters.
    """
    seconds = checks.number("seconds", seconds, 0, lo_open=True, finite=False)
    checks.positive_int("batch_size", batch_size)
    checks.number("lr", lr, 0, lo_open=True)
    checks.integer("warmup_steps", warmup_steps, 0)
    elbo = parse_estimator(estimator)
    checks.number("validation_fraction", validation_fraction, 0, 1, hi_open=True)
    checks.positive_int("eval_every", eval_every)
    if max_steps is not None:
        checks.positive_int("max_steps", max_steps)
    if math.isinf(seconds) and max_steps is None:
        raise ValueError("an unlimited time budget needs max_steps")
    check_batch(data)
    N = data.shape[0]
    num_validation = max(1, round(validation_fraction * N)) if validation_fraction > 0 else 0
    if N - num_validation < 1:
        raise ValueError(f"{N} examples leave none to train on after holding out {num_validation} for validation")
    pyro.set_rng_seed(seed)  # torch's global generator: the initial weights and the draws of z
    if vae is None:
        vae = VAE(tuple(data.shape[1:])).to(device=data.device, dtype=data.dtype)
    elif not isinstance(vae, VAE):
        raise TypeError(f"vae must be a pyrodiff.theory.vae.VAE, got {type(vae).__name__}")
    vae._check_parameters(data)
    with pyro.validation_enabled(True):
        vae.check_data(data)  # once here: the loop runs with validation off

    data_generator = torch.Generator().manual_seed(seed)  # the held-out split, then each epoch's order
    split = torch.randperm(N, generator=data_generator) if num_validation else torch.arange(N)
    held_out = split[:num_validation]
    validation = data[held_out.to(data.device)]
    train = data[split[num_validation:].to(data.device)] if num_validation else data
    run = _VAETraining(vae, elbo(), lr, warmup_steps)
    evaluations: list[list] = []
    best: tuple[float, int, dict] | None = None

    def evaluate() -> None:
        nonlocal best
        vae.eval()
        draws = torch.Generator(device=data.device).manual_seed(seed)
        nats = negative_elbo(vae, validation, generator=draws).total.mean().item()
        vae.train()
        evaluations.append([run.step, nats])
        if best is None or nats < best[0]:
            best = (nats, run.step, {k: v.detach().clone() for k, v in vae.state_dict().items()})

    order, position = torch.empty(0, dtype=torch.long), 0
    stopped_by = "time"
    vae.train()
    bar = tqdm(desc="train vae", unit="step", disable=not progress, mininterval=1.0, leave=False)
    with pyro.get_param_store().scope(), pyro.validation_enabled(False), bar:
        began = time.perf_counter()
        while True:
            if position + batch_size > len(order):  # a new epoch (the remainder of the last is dropped)
                order, position = torch.randperm(len(train), generator=data_generator).to(data.device), 0
            run.train_step(train[order[position : position + batch_size]])
            position += batch_size
            if run.step % LOG_EVERY == 0:
                run.read_losses(bar)
            if num_validation and run.step % eval_every == 0:
                run.read_losses(bar)  # a non-finite loss stops training before its weights are evaluated
                evaluate()
            if max_steps is not None and run.step >= max_steps:
                stopped_by = "max_steps"
                break
            if time.perf_counter() - began >= seconds:
                break
        run.read_losses(bar)
        if num_validation and run.step % eval_every:
            evaluate()
        elapsed = time.perf_counter() - began
    losses = run.losses
    best_step = run.step
    if best is not None:
        vae.load_state_dict(best[2])
        best_step = best[1]
    vae.eval()
    info = {
        "steps": len(losses),
        "seconds": elapsed,
        "steps_per_second": len(losses) / elapsed,
        "stopped_by": stopped_by,
        "losses": losses,
        "validation": evaluations,
        "best_step": best_step,
        "validation_indices": held_out.tolist(),
        "batch_size": batch_size,
        "lr": float(lr),
        "warmup_steps": warmup_steps,
        "estimator": estimator,
        "validation_fraction": float(validation_fraction),
        "eval_every": eval_every,
        "seed": seed,
    }
    return vae, info


# ---------------------------------------------------------------------- checkpoints
def save_vae(path: str | Path, vae: VAE, info: dict | None = None) -> None:
    """Write ``vae`` (its configuration and weights) and ``info`` (plain data, e.g. :func:`train_vae`'s) to
    ``path`` atomically (:func:`pyrodiff.training.checkpoint.save_checkpoint`).  The file has the checkpoint format's
    keys; a VAE keeps no EMA and its optimiser's state is not kept (``ema`` and ``optimizer`` are None)."""
    if not isinstance(vae, VAE):
        raise TypeError(f"vae must be a pyrodiff.theory.vae.VAE, got {type(vae).__name__}")
    info = dict(info or {})
    state = {
        "spec": {"kind": CHECKPOINT_KIND, "config": vae.config},
        "step": int(info.get("steps", 0)),
        "network": {k: v.detach() for k, v in vae.state_dict().items()},
        "ema": None,
        "optimizer": None,
        "info": info,
    }
    save_checkpoint(path, state)


def load_vae(path: str | Path, map_location: str | torch.device = "cpu") -> VAE:
    """The VAE saved by :func:`save_vae` at ``path`` (in evaluation mode, in the saved dtype), rebuilt from its
    configuration; :class:`~pyrodiff.training.checkpoint.CheckpointError` for a missing, corrupt or unsafe file, a
    diffusion model's checkpoint, or weights that do not fit the configuration."""
    state = load_checkpoint(path, map_location=map_location)
    spec = state["spec"]
    if not isinstance(spec, dict) or spec.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(
            f"{path} is not a VAE checkpoint (a diffusion model's? load that with pyrodiff.load_trained)"
        )
    try:
        vae = VAE(**spec["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the VAE's configuration is invalid: {e}") from e
    weights = state["network"]
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"{path} holds no VAE weights")
    vae = vae.to(dtype=next(iter(weights.values())).dtype, device=map_location)
    try:
        vae.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the VAE's configuration: {e}") from e
    return vae.eval()
