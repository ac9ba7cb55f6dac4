"""Stage 4, theory: cases where the answer is known exactly (the Gaussian case, Gaussian-mixture data, the exact
reverse of a finite data set), the unrolled program with one site per timestep, and the learned-encoder VAE
baseline.  Used by analysis and tests; the library's training and evaluation never import it.
"""
