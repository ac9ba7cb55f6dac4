"""The full decomposition of the bound (every term L_0..L_T) of N examples at T = 1000, against

- the floor: one forward pass of the network over the same N x T inputs (no gradient);
- the reference's method: a sequential loop over t with batch N (improved-diffusion's
  ``calc_bpd_loop``), computing the same terms one timestep at a time.

    python benchmarks/bound_terms.py [--device cpu|cuda] [--examples 8] [--repeats 3]

Goals (issue 3): decomposition / network forward <= 1.2, and faster than the loop.
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds  # benchmarks/timing.py

from pyrodiff import DiffusionModel, NoiseSchedule, UNet
from pyrodiff.chain.forward import q_marginal, q_posterior
from pyrodiff.chain.gaussian import normal_kl
from pyrodiff.evaluation.bound import bound_terms

T = 1000


@torch.no_grad()
def loop_terms(model: DiffusionModel, x0: torch.Tensor) -> torch.Tensor:
    """The reference's sequential method: one timestep (batch N) per network call."""
    N, event_dim = x0.shape[0], x0.dim() - 1
    terms = []
    for step in range(1, T + 1):
        t = torch.full((N,), step, device=x0.device)
        loc, var = q_marginal(model.schedule, x0, t)
        xt = loc + var.sqrt() * torch.randn_like(x0)
        mean, var_p, _ = model.predict(xt, t)
        if step == 1:
            terms.append(-model.decoder.distribution(mean, var_p, event_dim).log_prob(x0))
        else:
            loc_q, var_q = q_posterior(model.schedule, x0, xt, t)
            terms.append(normal_kl(loc_q, var_q, mean, var_p, event_dim))
    return torch.stack(terms, -1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=100)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = UNet(1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)).to(device).eval()
    model = DiffusionModel(net, NoiseSchedule.linear(T), decoder="discretized", levels=17)
    x0 = (torch.randint(0, 17, (args.examples, 1, 8, 8), device=device) / 8 - 1).float()
    N = args.examples
    flat_x = torch.randn(N * T, 1, 8, 8, device=device)
    flat_t = torch.arange(1, T + 1, device=device).repeat_interleave(N)

    @torch.no_grad()
    def network_forward():
        for xs, ts in zip(flat_x.split(args.chunk_size * N), flat_t.split(args.chunk_size * N), strict=True):
            net(xs, ts)

    floor = median_seconds(network_forward, device, args.repeats)
    ours = median_seconds(lambda: bound_terms(model, x0, chunk_size=args.chunk_size), device, args.repeats)
    loop = median_seconds(lambda: loop_terms(model, x0), device, args.repeats)
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; N = {N}, T = {T}, digits U-Net"
    )
    print(f"  network forward over N x T inputs   {floor * 1e3:9.1f} ms   ratio 1.000")
    print(f"  bound_terms (chunks of {args.chunk_size:4d} steps) {ours * 1e3:9.1f} ms   ratio {ours / floor:5.3f}")
    print(f"  sequential loop over t, batch N     {loop * 1e3:9.1f} ms   ratio {loop / floor:5.3f}")
    print(f"  loop / bound_terms: {loop / ours:.2f}x")


if __name__ == "__main__":
    main()
