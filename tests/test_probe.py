"""The probe's classifiers on features whose best achievable accuracy is known analytically."""
import math

import numpy as np

from mlcd_train.probe import knn_classify, linear_probe


def _two_gaussians(n, d, mu, rng):
    """Classes 0/1 with equal priors, x ~ N(+-mu e_1, I_d): the Bayes accuracy is Phi(mu)."""
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, d))
    x[:, 0] += np.where(y == 1, mu, -mu)
    return x.astype(np.float32), y


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_linear_probe_separable_classes_reach_100_percent():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 16)) * 8
    ytr, yte = rng.integers(0, 5, 1000), rng.integers(0, 5, 500)
    xtr = centres[ytr] + rng.standard_normal((1000, 16))
    xte = centres[yte] + rng.standard_normal((500, 16))
    res = linear_probe(xtr, ytr, xte, yte)
    assert res["top1"] == 1.0
    assert len(res["sweep"]) > 1 and res["l2"] in [s["l2"] for s in res["sweep"]]


def test_linear_probe_reaches_the_bayes_rate_of_overlapping_gaussians():
    rng = np.random.default_rng(1)
    mu = 1.0
    xtr, ytr = _two_gaussians(3000, 8, mu, rng)
    xte, yte = _two_gaussians(6000, 8, mu, rng)
    res = linear_probe(xtr, ytr, xte, yte)
    bayes = _phi(mu)  # 0.841
    # standard error of a 6000-sample accuracy is ~0.005; no classifier beats Bayes by more than noise
    assert abs(res["top1"] - bayes) < 0.02, (res["top1"], bayes)


def test_knn_on_separated_clusters_is_exact_and_follows_label_noise():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((4, 32)) * 5
    ytr, yte = rng.integers(0, 4, 2000), rng.integers(0, 4, 2000)
    xtr = centres[ytr] + rng.standard_normal((2000, 32)) * 0.3
    xte = centres[yte] + rng.standard_normal((2000, 32)) * 0.3
    assert knn_classify(xtr, ytr, xte, yte)["top1"] == 1.0
    # flip 25% of all labels (train and test) to another class uniformly: the 20 weighted
    # neighbours still vote for the true cluster, so accuracy = 1 - noise (the Bayes rate).
    p = 0.25

    def noisy(y):
        flip = rng.random(len(y)) < p
        other = (y + rng.integers(1, 4, len(y))) % 4
        return np.where(flip, other, y)

    res = knn_classify(xtr, noisy(ytr), xte, noisy(yte), k=20, temperature=0.07)
    assert abs(res["top1"] - (1 - p)) < 0.03, res


def test_knn_temperature_weights_close_neighbours_more():
    # one query; 1 neighbour of class 1 at similarity ~1, 3 of class 0 at similarity ~0.6:
    # a plain majority (large T) says 0, the sharp weighting (T = 0.07) says 1.
    q = np.array([[1.0, 0.0]])
    a = 0.6
    train = np.array([[1.0, 0.0]] + [[a, math.sqrt(1 - a * a)]] * 3)
    y = np.array([1, 0, 0, 0])
    assert knn_classify(train, y, q, [1], k=4, temperature=0.07)["top1"] == 1.0
    assert knn_classify(train, y, q, [1], k=4, temperature=100.0)["top1"] == 0.0


def test_the_logistic_fit_reaches_the_optimum_of_a_float64_autograd_reference():
    """fit_logistic_regression (float32 products, hand-written gradient) against the objective
    minimised in float64 with autograd: the same minimum value, the same predictions, and a
    gradient of the objective that vanishes at its answer."""
    import torch

    from mlcd_train.probe import fit_logistic_regression

    rng = np.random.default_rng(4)
    centres = rng.standard_normal((4, 12))
    y = torch.as_tensor(rng.integers(0, 4, 800))
    x = torch.as_tensor(centres[y.numpy()] + 1.5 * rng.standard_normal((800, 12)))
    l2 = 1e-3

    def objective(w, b):
        return torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()

    w, b = fit_logistic_regression(x, y, 4, l2)
    rw = torch.zeros(12, 4, dtype=torch.float64, requires_grad=True)
    rb = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([rw, rb], max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(rw, rb)
        loss.backward()
        return loss

    opt.step(closure)
    ours, ref = float(objective(w, b)), float(objective(rw.detach(), rb.detach()))
    assert abs(ours - ref) < 1e-6 * ref, (ours, ref)
    assert torch.equal((x @ w + b).argmax(1), (x @ rw + rb).argmax(1))
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    objective(wg, bg).backward()
    assert float(torch.cat([wg.grad.flatten(), bg.grad]).abs().max()) < 1e-4
