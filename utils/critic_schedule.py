"""Bie et al.'s (2023, "Private GANs, Revisited") adaptive schedule of critic steps per generator step (n_D).

Adaptive: n_D climbs a fixed ladder (1, 2, 5, 10, 20, ...), starting at --n_discr, never down, when the critic
loses its edge: an exponential moving average (decay 0.99) of its accuracy on generated samples (the share the
critic scores as fake) at or below a threshold, at least `grace` generator steps after the last change. The
accuracy is read off the scores the generator step computes anyway (a fresh batch of generated samples through
the current critic), so it is a function of the critic (a DP output) and the generator only: post-processing,
free of privacy cost.

The schedule moves generator steps, never critic steps: an epoch is always updates_per_epoch x --n_discr critic
steps (the last generator step of an epoch takes fewer if the rung does not divide the rest), so a run makes
exactly the noisy steps of the fixed --n_discr plan, and the calculator's noise for that plan gives its epsilon.
Choosing the next step's n_D from earlier outputs is adaptive composition of a fixed number of subsampled
Gaussian steps, which RDP accounting covers.
"""

LADDER = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
EMA_DECAY = 0.99


class AdaptiveCriticSteps:
    def __init__(self, start, threshold, grace):
        if start not in LADDER:
            raise ValueError(f"--n_discr {start}: the adaptive schedule starts on a rung of its ladder "
                             f"({', '.join(map(str, LADDER))})")
        if not 0 < threshold < 1:
            raise ValueError(f"--adaptive_critic {threshold}: the accuracy threshold must lie in (0, 1)")
        if grace < 1:
            raise ValueError(f"--adaptive_grace {grace}: must be at least 1 generator step")
        self.threshold, self.grace = threshold, grace
        self.rung, self.accuracy_ema, self.since_change = LADDER.index(start), None, 0

    @property
    def n_discr(self):
        return LADDER[self.rung]

    def observe(self, fake_scores):
        """After a generator step: fake_scores, the critic's logits on its generated batch (< 0: judged fake)."""
        accuracy = float((fake_scores.detach() < 0).float().mean())
        self.accuracy_ema = accuracy if self.accuracy_ema is None else \
            EMA_DECAY * self.accuracy_ema + (1 - EMA_DECAY) * accuracy
        self.since_change += 1
        if self.since_change >= self.grace and self.accuracy_ema <= self.threshold and self.rung < len(LADDER) - 1:
            self.rung, self.since_change = self.rung + 1, 0

    def state_dict(self):
        return {"rung": self.rung, "accuracy_ema": self.accuracy_ema, "since_change": self.since_change}

    def load_state_dict(self, state):
        self.rung, self.accuracy_ema, self.since_change = state["rung"], state["accuracy_ema"], state["since_change"]

