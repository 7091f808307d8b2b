"""How far a float32 computation may be from its exact value: the tolerances of the tests that hold
a float32 step against a float64 reference, derived from the arithmetic, not measured.

One float32 rounding moves a value by at most eps/2 of its size (eps = 2^-23 ~ 1.19e-7); a sum of
n terms, in any order, is within (n - 1) eps/2 * sum|terms| of the exact sum (Higham, "Accuracy and
Stability of Numerical Algorithms", Sec. 4.2). The bounds below count eps per rounding: 2x margin.
"""

import math

import torch

EPS = torch.finfo(torch.float32).eps
U32 = EPS / 2  # float32's unit roundoff: one rounding moves a value by at most this much of its size
U64 = torch.finfo(torch.float64).eps / 2  # float64's
DENSITY_ROUNDINGS = 8  # log N(x; mu, s^2) per element: subtract, square, divide, log, and the sums


def gaussian_log_prob_error(x, mean, std, mean_error, std_error, reduction: str) -> torch.Tensor:
    """A bound, per sample, on |float32 log N(x; mean', std'^2 I) - log N(x; mean, std^2 I)| for a
    float32 mean' within `mean_error` (per element) of `mean` and std' within `std_error`
    (relative) of `std`, the density reduced over the latent (`mean` or `sum`) in float32.
    All arguments float64; x is the float32 action itself, the same in both."""
    z, d = (x - mean).abs() / std, mean_error / std
    terms = z**2 / 2 + std.log().abs() + math.log(math.sqrt(2 * math.pi))
    per_element = (
        z * d + d**2 / 2  # (x - mu)^2 / (2 s^2) moved by mu's error
        + 2 * std_error * (z**2 + 1)  # ... and by s's, with log s (first order, doubled for the second)
        + DENSITY_ROUNDINGS * EPS * terms  # the density's own roundings
    )
    dims = tuple(range(1, x.ndim))
    n = math.prod(x.shape[1:])
    error = per_element.sum(dim=dims) + n * EPS * terms.sum(dim=dims)  # + the sum over n elements
    return error / n if reduction == "mean" else error
