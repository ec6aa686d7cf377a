"""End-to-end search over plans with the KLD oracle (the ``kld`` strategy's refine step)."""
