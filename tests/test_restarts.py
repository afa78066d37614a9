"""Finding the best mode: restarts, start strategies, SQUAREM, degenerate solutions.

The seed examples' models (the 1-D Gaussian mixture and the zero-inflated Poisson)
are fitted with plain EM and with SQUAREM from the same start; both must reach the
same optimum, SQUAREM in fewer E-steps and without ever lowering the log-posterior.
"""

import warnings

import numpy as np
import pymc as pm
import pytest
from sklearn.cluster import KMeans

import pm_em
from pm_em.fit.starts import kmeans_targets, start_points
from tests import models

TOL = 1e-10


@pytest.fixture(scope="module")
def mixture():
    from examples import gaussian_mixture as example

    x = example.simulate_data(n=400)
    model = example.build_model(x)
    return model, example.initial_values(x)


@pytest.fixture(scope="module")
def zip_model():
    from examples import zero_inflated_poisson as example

    x = example.simulate_data(n=400)
    return example.build_model(x), {"psi": np.array(0.5), "rate": np.array(3.0)}


def _fit(model, start, **kwargs):
    return pm_em.find_MAP(model, initvals=start, tol=TOL, progressbar=False, **kwargs)


@pytest.mark.parametrize("case", ["mixture", "zip_model"])
def test_squarem_reaches_the_em_optimum_in_fewer_e_steps(case, request):
    model, start = request.getfixturevalue(case)
    plain = _fit(model, start)
    fast = _fit(model, start, accelerate="squarem")
    for name in start:
        np.testing.assert_allclose(
            fast.posterior[name].values, plain.posterior[name].values, rtol=1e-4, atol=1e-6
        )
    n_obs = model.observed_RVs[0].size.eval(mode="FAST_COMPILE")
    assert abs(float(fast.em_stats["logp"][-1] - plain.em_stats["logp"][-1])) / n_obs < 1e-8
    # The ratios are in benchmarks/restarts.py; here: fewer, and counted in full
    # (the start, three EM maps per cycle, one in the last, converged cycle).
    assert int(fast.em_stats["n_e_steps"]) < int(plain.em_stats["n_e_steps"])
    assert int(fast.em_stats["n_e_steps"]) >= 3 * int(fast.em_stats["n_iter"]) - 1
    trace = fast.em_stats["logp"].values
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
    assert fast.em_stats.attrs["accelerate"] == "squarem"


def test_em_run_with_squarem(mixture):
    model, start = mixture
    em = pm_em.routine.em.cached_routine(model)
    point, history = em.run(start, tol=TOL, accelerate="squarem")
    plain_point, plain_history = em.run(start, tol=TOL, accelerate=None)
    assert history.converged and plain_history.converged
    assert history.n_e_steps < plain_history.n_e_steps
    np.testing.assert_allclose(point["mu"], plain_point["mu"], rtol=1e-4)
    with pytest.raises(ValueError, match="accelerate"):
        em.run(start, accelerate="anderson")


@pytest.fixture(scope="module")
def restarted(mixture):
    model, _ = mixture
    return pm_em.find_MAP(model, n_init=4, init="prior", random_seed=7, progressbar=False)


def test_best_start_wins(restarted):
    stats = restarted.em_stats
    finals = [
        row[np.isfinite(row)][-1] for row in stats["restart_logp"].values
    ]  # every start's final log-posterior
    best = stats.attrs["best_restart"]
    assert finals[best] == max(finals)
    assert stats["logp"].values[-1] == finals[best]
    assert stats.sizes["restart"] == 4
    assert int(stats["n_e_steps"]) == int(stats["restart_n_e_steps"][best])


def test_restarts_are_reproducible(mixture, restarted):
    model, _ = mixture
    again = pm_em.find_MAP(model, n_init=4, init="prior", random_seed=7, progressbar=False)
    np.testing.assert_array_equal(
        again.em_stats["restart_logp"].values, restarted.em_stats["restart_logp"].values
    )
    em = pm_em.routine.em.cached_routine(model)
    first = start_points(em, "jitter", 3, random_seed=1)
    second = start_points(em, "jitter", 3, random_seed=1)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["mu"], b["mu"])
    assert not np.array_equal(first[0]["mu"], first[1]["mu"])  # one seed per start


def test_kmeans_start_matches_kmeans(mixture):
    model, _ = mixture
    em = pm_em.routine.em.cached_routine(model)
    (target,) = kmeans_targets(em)
    assert target.param == "mu" and target.n_clusters == 2
    (start,) = start_points(em, "kmeans", 1, random_seed=3)
    data = target.data.reshape(-1, 1)
    # A fixed point of Lloyd's algorithm: each center is the mean of its points...
    labels = np.argmin(np.abs(data - start["mu"][None]), axis=1)
    centers = [data[labels == k].mean() for k in range(2)]
    np.testing.assert_allclose(start["mu"], centers, rtol=1e-12)
    # ...near scikit-learn's best of ten k-means runs.
    reference = KMeans(2, n_init=10, random_state=0).fit(data)
    np.testing.assert_allclose(start["mu"], np.sort(reference.cluster_centers_.ravel()), atol=0.05)
    assert start_points(em, "auto", 1, random_seed=3)[0]["mu"] == pytest.approx(start["mu"])


def test_start_strategies_are_checked(mixture, zip_model):
    model, _ = mixture
    with pytest.raises(ValueError, match="init must be one of"):
        pm_em.find_MAP(model, init="random", progressbar=False)
    with pytest.raises(ValueError, match="n_init must be an integer >= 1"):
        pm_em.find_MAP(model, n_init=0, progressbar=False)
    with pytest.raises(ValueError, match=r"init\['nu'\]"):
        pm_em.find_MAP(model, init={"nu": 1.0}, progressbar=False)
    zip_em = pm_em.routine.em.cached_routine(zip_model[0])
    with pytest.raises(ValueError, match="init='kmeans' needs a location"):
        start_points(zip_em, "kmeans")


def test_dict_start(mixture):
    model, start = mixture
    idata = pm_em.find_MAP(model, init=start, tol=TOL, progressbar=False)
    reference = _fit(model, start)
    np.testing.assert_allclose(idata.posterior["mu"], reference.posterior["mu"])
    assert idata.em_stats.attrs["init"] == "values"


def test_default_start_escapes_the_symmetric_saddle(rng):
    """From the model's default point both components are identical; EM alone would
    stay there. Every default start (jitter or k-means) must separate them."""
    x = np.concatenate([rng.normal(-2, 1, 150), rng.normal(2, 1, 150)])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    for init in ("jitter", "auto"):
        idata = pm_em.find_MAP(model, init=init, random_seed=5, progressbar=False)
        mu_hat = np.sort(idata.posterior["mu"].values.ravel())
        np.testing.assert_allclose(mu_hat, [-2, 2], atol=0.4)


@pytest.fixture(scope="module")
def spike_model():
    """A one-observation outlier a component can shrink onto (flat scale prior)."""
    return models.spike_model(models.SPIKE_DATA), models.SPIKE_START


def test_collapsing_component_is_reported(spike_model):
    model, spike = spike_model
    with pytest.warns(pm_em.DegenerateSolutionWarning, match=r"sigma\[1\].*InverseGamma"):
        idata = pm_em.find_MAP(model, initvals=spike, progressbar=False)
    assert bool(idata.em_stats["restart_degenerate"][0])
    assert not bool(idata.em_stats["converged"])
    em = pm_em.routine.em.cached_routine(model)
    with pytest.warns(pm_em.DegenerateSolutionWarning):
        _, history = em.run(spike, tol=TOL)
    assert history.collapse is not None and history.collapse.parameter == "sigma"


def test_restarts_skip_collapsed_starts(spike_model):
    model, spike = spike_model
    spread = {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0]), "sigma": np.ones(2)}
    em = pm_em.routine.em.cached_routine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pm_em.DegenerateSolutionWarning)
        _, collapsed = em.run(spike, tol=TOL)
        point, sound = em.run(spread, tol=TOL)
    assert collapsed.collapse is not None and sound.collapse is None
    # The collapsed start's last log-posterior is the larger (it grows without
    # bound), yet the sound start wins.
    assert collapsed.logp[-1] > sound.logp[-1]
    assert pm_em.fit.loop.best_start([collapsed, sound]) == 1


def test_a_component_prior_keeps_the_mode_finite(spike_model):
    """With an InverseGamma scale prior (what the warning suggests) the same start
    converges to a finite mode."""
    model, spike = spike_model
    x = model.rvs_to_values[model["x"]].data
    with pm.Model() as proper:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Flat("mu", shape=2)
        sigma = pm.InverseGamma("sigma", 2.0, 1.0, shape=2)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    idata = pm_em.find_MAP(proper, initvals=spike, progressbar=False)
    assert bool(idata.em_stats["converged"])
    assert not bool(idata.em_stats["restart_degenerate"][0])
    assert float(idata.posterior["sigma"].min()) > 0.05


def test_one_progress_bar_across_starts(mixture, capsys):
    model, _ = mixture
    idata = pm_em.find_MAP(model, n_init=2, random_seed=1, progressbar=True, tol=1e-6)
    shown = capsys.readouterr().out
    assert "EM start 2/2" in shown and "best =" in shown
    assert idata.em_stats.sizes["restart"] == 2


# -- accelerate="auto" (the default) and starts at different modes -------------------


@pytest.fixture(scope="module")
def ridge():
    """A K = 4 mixture on log-normal data (benchmarks/restarts.py, smaller): plain EM
    crawls (130-300 iterations to tol 1e-8), and k-means starts end at two modes."""
    x = np.random.default_rng(5).lognormal(0.0, 0.6, 300)
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(4))
        mu = pm.Normal("mu", 0.0, 10.0, shape=4)
        sigma = pm.InverseGamma("sigma", 2.0, 0.1, shape=4)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Normal("x", mu[z], sigma[z], observed=x)
    em = pm_em.EM(model)
    return model, em, start_points(em, "auto", 4, random_seed=0)


def test_auto_is_plain_em_on_fast_fits(mixture):
    """The seed mixture converges within 30 steps at the default tol: the
    default fit is plain EM's, bit for bit."""
    model, start = mixture
    plain = pm_em.find_MAP(model, initvals=start, accelerate=None, progressbar=False)
    auto = pm_em.find_MAP(model, initvals=start, progressbar=False)
    assert int(plain.em_stats["n_iter"]) <= pm_em.fit.loop.AUTO_SQUAREM_AFTER
    np.testing.assert_array_equal(auto.em_stats["logp"].values, plain.em_stats["logp"].values)
    for name in start:
        np.testing.assert_array_equal(auto.posterior[name].values, plain.posterior[name].values)
    assert auto.em_stats.attrs["accelerate"] == "auto"
    assert auto.em_stats.attrs["squarem_from"] == -1
    assert plain.em_stats.attrs["accelerate"] == "None"
    assert int(plain.em_stats["n_e_steps"]) == int(plain.em_stats["n_iter"]) + 1


def test_auto_switches_to_squarem_on_a_ridge(ridge):
    """Plain EM for 30 steps (the same trace), then SQUAREM: the optimum plain EM
    reaches, in far fewer E-steps, never decreasing."""
    model, em, starts = ridge
    start = starts[1]
    _, plain = em.run(start, accelerate=None)
    point, auto = em.run(start)
    _, fast = em.run(start, accelerate="squarem")
    after = pm_em.fit.loop.AUTO_SQUAREM_AFTER
    assert (plain.squarem_from, auto.squarem_from, fast.squarem_from) == (None, after, 0)
    assert plain.converged and auto.converged and plain.n_iter > 4 * after
    assert plain.n_e_steps == plain.n_iter + 1
    assert auto.logp[: after + 1] == plain.logp[: after + 1]
    assert auto.n_e_steps < plain.n_e_steps / 3
    assert np.all(np.diff(auto.logp) >= 0)
    # The optimum itself: SQUAREM from the end point to a far tighter tol.
    _, optimum = em.run(point, tol=1e-14, max_iter=20_000, accelerate="squarem")
    n_obs = 300
    assert 0 <= (optimum.logp[-1] - auto.logp[-1]) / n_obs < 1e-6
    assert 0 <= (optimum.logp[-1] - plain.logp[-1]) / n_obs < 1e-6
    idata = pm_em.find_MAP(model, initvals=start, progressbar=False)
    assert idata.em_stats.attrs["squarem_from"] == after
    assert idata.em_stats["restart_squarem_from"].values.tolist() == [after]


def test_starts_at_different_modes_warn(ridge):
    model, em, starts = ridge
    # The four starts' own optima (each refined far past tol): two modes, ~0.9 nats
    # apart, the best reached by start 1 only.
    optima = []
    for start in starts:
        point, _ = em.run(start, accelerate=None)
        _, refined = em.run(point, tol=1e-14, max_iter=20_000, accelerate="squarem")
        optima.append(refined.logp[-1])
    optima = np.array(optima)
    assert np.argmax(optima) == 1 and np.sum(optima.max() - optima < 1e-3) == 1
    with pytest.warns(pm_em.MultimodalWarning, match=r"1 of 4 converged starts.*raise n_init"):
        idata = pm_em.find_MAP(model, n_init=4, random_seed=0, progressbar=False)
    stats = idata.em_stats
    finals = np.array([row[np.isfinite(row)][-1] for row in stats["restart_logp"].values])
    assert stats.attrs["best_restart"] == 1
    assert stats.attrs["restarts_at_best"] == 1
    assert stats.attrs["restart_spread"] == pytest.approx(finals.max() - finals.min())
    np.testing.assert_allclose(stats.attrs["restart_spread"], np.ptp(optima), atol=1e-3)


def test_starts_at_one_mode_do_not_warn(mixture, restarted):
    """The seed mixture's four prior starts reach one mode: no warning (the fixture ran
    with warnings as errors), every start counted at the best, no spread."""
    model, _ = mixture
    stats = restarted.em_stats
    finals = np.array([row[np.isfinite(row)][-1] for row in stats["restart_logp"].values])
    n_obs = 400
    assert np.ptp(finals) / n_obs < 1e-9  # one mode, to within the stopping rule
    assert stats.attrs["restarts_at_best"] == 4
    assert stats.attrs["restart_spread"] == 0.0
