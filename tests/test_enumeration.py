"""E-step and observed-data log-posterior against brute-force enumeration.

The reference enumerates every joint configuration of all latents with
itertools.product and evaluates the model's own joint log-density (PyMC's
``compile_logp``, no Jacobian) at each; logsumexp over configurations gives the
exact log marginal, and normalized sums give the exact posterior marginals. Mixtures
too large for that are checked against SciPy's densities, component by component.
"""

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from pytensor.graph.replace import vectorize_graph
from pytensor.graph.rewriting.basic import in2out
from pytensor.graph.rewriting.utils import rewrite_graph
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.slinalg import Cholesky, SolveBase, solve, solve_triangular
from scipy import stats
from scipy.special import logsumexp

import pm_em
from pm_em.estep.pointwise import direct_pointwise, pointwise_loglik
from pm_em.estep.rewrites import local_matrix_b_solve
from pm_em.estep.standins import latent_mask, plan_standins, vectorize_with_standins
from pm_em.model.analysis import analyze_model
from pm_em.results.fit_result import most_probable
from tests.helpers import brute_force


def mixture_model():
    x = np.array([-1.0, 0.3, 2.5])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0, 10, shape=2)
        sigma = pm.HalfNormal("sigma", 5, shape=2)
        z = pm.Categorical("z", p=w, shape=3)
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    return model


def repeated_measures_model():
    group = np.array([0, 1, 1, 2, 0, 2, 2])
    y = np.array([0.1, 2.2, 1.9, -0.4, 0.5, 0.2, -0.1])
    with pm.Model() as model:
        p = pm.Beta("p", 2, 2)
        mu = pm.Normal("mu", 0, 5, shape=2)
        z = pm.Bernoulli("z", p=p, shape=3)
        pm.Normal("y", mu=mu[z[group]], sigma=1.0, observed=y)
    return model


def chained_latents_model():
    # z2[i] depends on z1[i]; x[i] on both.
    x = np.array([0.2, 1.7, 3.1])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        transition = pm.Dirichlet("transition", a=np.ones((2, 3)))
        mu = pm.Normal("mu", 0, 5, shape=(2, 3))
        z1 = pm.Categorical("z1", p=w, shape=3)
        z2 = pm.Categorical("z2", p=transition[z1], shape=3)
        pm.Normal("x", mu=mu[z1, z2], sigma=1.0, observed=x)
    return model


def global_latent_model():
    # A scalar regime switches the mean of every element-level mixture.
    x = np.array([0.4, 2.1, 2.9, -0.3])
    with pm.Model() as model:
        regime_p = pm.Beta("regime_p", 1, 1)
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0, 5, shape=2)
        shift = pm.Normal("shift", 0, 2)
        regime = pm.Bernoulli("regime", p=regime_p)
        z = pm.Categorical("z", p=w, shape=4)
        pm.Normal("x", mu=mu[z] + regime * shift, sigma=1.0, observed=x)
    return model


def binomial_latent_model():
    # Binomial latent with per-element n: support 0..max(n), -inf beyond each n_i.
    with pm.Model() as model:
        theta = pm.Beta("theta", 2, 2)
        k = pm.Binomial("k", n=np.array([2, 3]), p=theta, shape=2)
        pm.Poisson("y", mu=1.0 + k, observed=np.array([1, 4]))
    return model


def truncated_poisson_model():
    # An infinite-support count made finite by truncation (lower bound from Poisson).
    with pm.Model() as model:
        rate = pm.Gamma("rate", 2, 1)
        k = pm.Truncated("k", pm.Poisson.dist(rate), upper=4, shape=2)
        pm.Normal("y", mu=k, sigma=0.7, observed=np.array([1.2, 3.5]))
    return model


def scattered_observations_model():
    # Observations of some latent elements only, out of order, by two variables: each
    # element has at most one, so the pointwise log-likelihood is computed directly
    # (pm_em.estep.pointwise.direct_pointwise), through the owner indices.
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(3))
        mu = pm.Normal("mu", 0, 5, shape=3)
        z = pm.Categorical("z", p=w, shape=5)
        pm.Normal("x", mu[z[np.array([4, 0, 2])]], 1.0, observed=np.array([0.3, 2.0, -1.0]))
        pm.Normal("y", mu[z[np.array([1, 3])]], 2.0, observed=np.array([1.5, 4.0]))
    return model


MODELS = {
    "mixture": mixture_model,
    "repeated_measures": repeated_measures_model,
    "chained_latents": chained_latents_model,
    "global_latent": global_latent_model,
    "binomial_latent": binomial_latent_model,
    "truncated_poisson": truncated_poisson_model,
    "scattered_observations": scattered_observations_model,
}


_ROUTINES = {}


def compiled(name):
    """One compiled EM routine per model for the whole module (compilation is slow)."""
    if name not in _ROUTINES:
        _ROUTINES[name] = pm_em.EM(MODELS[name]())
    return _ROUTINES[name]


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def routine(request):
    return compiled(request.param)


def test_e_step_and_logp_match_brute_force(routine):
    point = routine.initial_point(random_seed=3)
    log_marginal, marginals, *_ = brute_force(routine, point)
    # logp adds the latent-free terms (priors); the brute force includes them too.
    np.testing.assert_allclose(routine.logp(point), log_marginal, rtol=1e-10)
    log_resp = routine.e_step(point)
    assert set(log_resp) == set(marginals)
    for name, expected in marginals.items():
        np.testing.assert_allclose(np.exp(log_resp[name]), np.exp(expected), atol=1e-10)
        np.testing.assert_allclose(np.exp(log_resp[name]).sum(-1), 1.0, atol=1e-12)


def test_step_by_step_never_decreases_logp(routine):
    point = routine.initial_point(random_seed=5)
    history = [routine.logp(point)]
    for _ in range(8):
        point = routine.m_step(point, routine.e_step(point))
        history.append(routine.logp(point))
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[:-1]))
    assert history[-1] > history[0]


@pytest.mark.filterwarnings("ignore::pm_em.EMConvergenceWarning")
def test_pointwise_loglik_sums_to_observed_loglik(routine):
    # The identity holds at any point; a few iterations keep the test fast. Jitter,
    # not k-means: on three observations k-means leaves one alone, and its scale
    # collapses (the likelihood is unbounded there), which is not this test's subject.
    idata = pm_em.find_MAP(
        routine.model, init="jitter", random_seed=1, progressbar=False, max_iter=10
    )
    point = {p.name: idata.posterior[p.name].values[0, 0] for p in routine.params}
    # Reference: the brute-force log marginal minus the latent-free prior terms.
    log_marginal, *_ = brute_force(routine, point)
    prior = sum(
        pm.logp(p.rv, point[p.name]).sum().eval(mode="FAST_COMPILE") for p in routine.params
    )
    total = sum(idata.log_likelihood[name].sum().item() for name in idata.log_likelihood)
    assert np.isclose(total, log_marginal - prior, rtol=1e-8)


def test_direct_pointwise_matches_the_chain_rule_path(routine):
    # Where the pointwise log-likelihood is computed inside the compiled result
    # function (pm_em.estep.pointwise.direct_pointwise), it equals the general chain-rule
    # computation on the per-configuration term tables.
    em = routine
    point = em.initial_point(random_seed=2)
    values = em.to_values(point)
    log_resp = em.e_step(point)
    labels = {
        lat.name: most_probable(log_resp[lat.name], lat.support, lat.value.type.dtype)
        for lat in em.latents
    }
    _, pointwise = em.routine.result_outputs(values, labels, {})
    for comp, tables in zip(em.structure.components, em.graphs.tables):
        if not direct_pointwise(comp):
            continue
        groups = [list(ts) for ts in tables.group_term_tables]
        outputs = [t for ts in groups for t in ts]
        evaluate = pytensor.function(
            em.graphs.values, outputs, on_unused_input="ignore", mode="FAST_COMPILE"
        )
        flat = iter(evaluate(*values))
        group_values = [[np.asarray(next(flat)) for _ in ts] for ts in groups]
        expected = pointwise_loglik(comp, [], group_values)
        for name, value in expected.items():
            np.testing.assert_allclose(pointwise[name], value, rtol=1e-12, atol=1e-12)


def test_direct_pointwise_is_for_one_observation_per_element():
    for name in ("mixture", "scattered_observations"):
        assert all(direct_pointwise(c) for c in compiled(name).structure.components)
    for name in ("repeated_measures", "global_latent"):
        assert not any(direct_pointwise(c) for c in compiled(name).structure.components)


def test_plain_dict_rejected_for_jointly_enumerated_latents():
    em = compiled("chained_latents")
    point = em.initial_point(random_seed=0)
    log_resp = dict(em.e_step(point))
    with pytest.raises(ValueError, match="enumerated jointly"):
        em.m_step(point, log_resp)


def test_interval_latent_support_is_exact():
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 3)
        k = pm.DiscreteUniform("k", lower=-1, upper=2, shape=2)
        pm.Normal("y", mu=mu + k, sigma=1.0, observed=np.array([0.5, 2.0]))
    em = pm_em.EM(model)
    (latent,) = em.latents
    np.testing.assert_array_equal(latent.support, [-1, 0, 1, 2])
    point = em.initial_point(random_seed=0)
    log_marginal, marginals, *_ = brute_force(em, point)
    np.testing.assert_allclose(em.logp(point), log_marginal, rtol=1e-10)
    np.testing.assert_allclose(em.e_step(point)["k"], marginals["k"], atol=1e-10)


def test_pt_ops_in_dependents_are_supported():
    x = np.array([[0.1, 0.2], [2.0, 2.1], [0.0, -0.2]])
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 5, shape=(2, 2))
        z = pm.Bernoulli("z", p=0.5, shape=3)
        pm.Normal("x", mu=pt.exp(mu[z]) - 1.0, sigma=1.0, observed=x)
    em = pm_em.EM(model)
    point = em.initial_point(random_seed=0)
    log_marginal, marginals, *_ = brute_force(em, point)
    np.testing.assert_allclose(em.logp(point), log_marginal, rtol=1e-10)
    np.testing.assert_allclose(em.e_step(point)["z"], marginals["z"], atol=1e-10)


# -- stand-ins: latents evaluated once per support value -----------------------------


def _lower_cholesky(n_components, prefix):
    """Per-component 2x2 Cholesky factors built from free variables, (K, 2, 2)."""
    diag = pm.HalfNormal(f"{prefix}_diag", 2.0, shape=(n_components, 2))
    offdiag = pm.Normal(f"{prefix}_offdiag", 0.0, 1.0, shape=n_components)
    chol = pt.zeros((n_components, 2, 2))[:, [0, 1], [0, 1]].set(diag)
    return chol[:, 1, 0].set(offdiag)


def _mv_data(n=30, seed=11):
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0], [3.0, 0.5], [0.5, 3.0]])
    return means[rng.choice(3, size=n)] + rng.normal(size=(n, 2))


def mv_chol_model():
    X = _mv_data()
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        mu = pm.Normal("mu", 0, 5, shape=(3, 2))
        chol = pm.Deterministic("chol", _lower_cholesky(3, "chol"))
        z = pm.Categorical("z", p=w, shape=len(X))
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=X)
    return model


def mv_cov_model():
    X = _mv_data(seed=12)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        mu = pm.Normal("mu", 0, 5, shape=(3, 2))
        chol = _lower_cholesky(3, "chol")
        cov = pm.Deterministic("cov", chol @ chol.mT)
        z = pm.Categorical("z", p=w, shape=len(X))
        pm.MvNormal("x", mu=mu[z], cov=cov[z], observed=X)
    return model


MV_MODELS = {"mv_chol": mv_chol_model, "mv_cov": mv_cov_model}
_MV_ROUTINES = {}


def compiled_mv(name):
    """All-numeric M-step, so that its gradient goes through the enumerated tables."""
    if name not in _MV_ROUTINES:
        _MV_ROUTINES[name] = pm_em.EM(MV_MODELS[name](), closed_form=False)
    return _MV_ROUTINES[name]


def scipy_mixture_reference(em, point):
    """Exact log marginal and log responsibilities of an MvNormal mixture, one SciPy
    density per component (in log space), plus PyMC's log-prior of the parameters."""
    X = em.model.rvs_to_values[em.model["x"]].data
    chol = np.zeros((3, 2, 2))
    chol[:, [0, 1], [0, 1]] = point["chol_diag"]
    chol[:, 1, 0] = point["chol_offdiag"]
    covs = chol @ np.swapaxes(chol, -1, -2)
    log_joint = np.stack(
        [
            np.log(point["w"][k]) + stats.multivariate_normal(point["mu"][k], covs[k]).logpdf(X)
            for k in range(len(covs))
        ],
        axis=1,
    )
    per_obs = logsumexp(log_joint, axis=1)
    prior = sum(pm.logp(p.rv, point[p.name]).sum().eval(mode="FAST_COMPILE") for p in em.params)
    return per_obs.sum() + prior, log_joint - per_obs[:, None]


@pytest.mark.parametrize("name", list(MV_MODELS))
def test_mvnormal_mixture_matches_scipy(name):
    em = compiled_mv(name)
    point = em.initial_point(random_seed=2)
    log_marginal, log_resp = scipy_mixture_reference(em, point)
    np.testing.assert_allclose(em.logp(point), log_marginal, rtol=1e-10)
    np.testing.assert_allclose(em.e_step(point)["z"], log_resp, atol=1e-9)


@pytest.mark.parametrize("name", list(MV_MODELS))
def test_mvnormal_mixture_factorizes_once_per_component(name):
    # The Cholesky factorizations and solves loop over the 3 components, never over
    # the 30 observations: in the E-step and in the M-step's gradient alike.
    em = compiled_mv(name)
    for fn in (f for f in (em.routine._e_step_fn, em.routine._objective_fn) if f is not None):
        linalg = [
            node
            for node in fn.maker.fgraph.apply_nodes
            if isinstance(node.op, Blockwise) and isinstance(node.op.core_op, Cholesky | SolveBase)
        ]
        assert linalg
        for node in linalg:
            batch_shape = node.outputs[0].type.shape[: node.op.batch_ndim(node)]
            assert None not in batch_shape
            assert np.prod(batch_shape, dtype=int) <= 3, (node, batch_shape)


def reversed_index_model():
    # z[::-1] slices the latent: the stand-in would index a single copy.
    x = np.array([-0.8, 0.4, 2.6, 1.9])
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 5, shape=2)
        z = pm.Bernoulli("z", p=np.float64(0.4), shape=4)
        pm.Normal("x", mu=mu[z[::-1]], sigma=0.8, observed=x)
    return model


def concatenated_model():
    # Two observations per latent element, joined along the latent's axis.
    y = np.array([0.1, 2.2, -0.3, 0.4, 1.8, 0.2])
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 5, shape=2)
        z = pm.Bernoulli("z", p=np.float64(0.5), shape=3)
        pm.Normal("y", mu=mu[pt.concatenate([z, 1 - z])], sigma=1.0, observed=y)
    return model


def reshaped_model():
    # The parameter gathered by the latent is reshaped before use.
    x = np.array([[0.3, 2.4], [1.1, -0.2]])
    with pm.Model() as model:
        mu = pm.Normal("mu", 0, 5, shape=2)
        z = pm.Bernoulli("z", p=np.float64(0.5), shape=4)
        pm.Normal("x", mu=mu[z].reshape((2, 2)), sigma=1.0, observed=x)
    return model


FULL_SUBSTITUTION_MODELS = {
    "reversed_index": reversed_index_model,
    "concatenated": concatenated_model,
    "reshaped": reshaped_model,
}


@pytest.mark.parametrize("name", list(FULL_SUBSTITUTION_MODELS))
def test_ops_that_need_the_full_substitution(name):
    model = FULL_SUBSTITUTION_MODELS[name]()
    structure = analyze_model(model)
    (latent,) = structure.latents
    observed = [t for t in structure.terms if t.kind == "observed"]
    for term in observed:
        plan = plan_standins(term.logp, {latent.value: latent_mask(latent.shape)})
        assert not plan.standins
    em = pm_em.EM(model)
    point = em.initial_point(random_seed=4)
    log_marginal, marginals, *_ = brute_force(em, point)
    np.testing.assert_allclose(em.logp(point), log_marginal, rtol=1e-10)
    np.testing.assert_allclose(em.e_step(point)["z"], marginals["z"], atol=1e-10)


def test_standin_plans():
    # mixture: mu[z] and sigma[z], and the Categorical's own log-probability (whose
    # arange index has a length known only after shape rewrites), once per support
    # value. chained_latents: z1 indexes the probabilities of z2, so z2's
    # log-probability needs z1's full batch (the probabilities are looked up by row).
    expected = {
        "mixture": {"z": {"z"}, "x": {"z"}},
        "chained_latents": {"z1": {"z1"}, "z2": {"z2"}, "x": {"z1", "z2"}},
        "repeated_measures": {"z": {"z"}, "y": set()},
    }
    for name, plans in expected.items():
        structure = analyze_model(MODELS[name]())
        candidates = {lat.value: latent_mask(lat.shape) for lat in structure.latents}
        for term in structure.terms:
            if term.latents:
                plan = plan_standins(term.logp, candidates)
                assert {v.name for v in plan.standins} == plans[term.name], (name, term.name)


def _rule_graphs():
    """Small graphs of a latent ``z`` (n = 4, support 0..2) and whether the stand-in
    is exact for them."""
    z = pt.vector("z", dtype="int64", shape=(4,))
    mu = pt.constant(np.array([0.5, -1.0, 2.0]))
    mu2 = pt.constant(np.arange(6.0).reshape(3, 2))
    X = pt.constant(np.linspace(0.0, 1.0, 8).reshape(4, 2))
    return z, {
        "elementwise": (pt.exp(mu[z]) * X[:, 0], True),
        "sum_over_full_axis": ((mu2[z] * X).sum(axis=1), True),
        "max_over_latent_axis": (pt.max(mu[z]) + X[:, 0], True),
        "column_of_gather": (mu2[z][:, 1] + X[:, 0], True),
        "sum_over_latent_axis": (pt.sum(mu[z]) + X[:, 0], False),
        "reshape": (mu[z].reshape((2, 2)), False),
        "reversed": (mu[z[::-1]], False),
        "shape": (mu[z] * pt.cast(mu[z].shape[0], "float64"), False),
    }


@pytest.mark.parametrize("name", list(_rule_graphs()[1]))
def test_squeeze_rules_are_exact(name):
    z, graphs = _rule_graphs()
    term, allowed = graphs[name]
    plan = plan_standins(term, {z: latent_mask((4,))})
    assert bool(plan.standins) == allowed
    values = np.array([0, 1, 2])
    full = vectorize_graph(term, {z: pt.constant(np.repeat(values[:, None], 4, axis=1))})
    expected = full.eval()
    if allowed:
        standin = pt.constant(values[:, None])
        batched = vectorize_with_standins(term, plan, {z: standin})
        actual = pt.broadcast_to(batched, full.shape).eval()
        np.testing.assert_allclose(actual, expected, rtol=1e-14)


# -- the matrix right-hand side rewrite ------------------------------------------------


def _rewritten(outputs):
    return rewrite_graph(outputs, include=(), custom_rewrite=in2out(local_matrix_b_solve))


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "kind"),
    [
        ((3, 1, 2, 2), (3, 5, 2), "triangular"),  # per component, per observation
        ((1, 3, 2, 2), (4, 3, 2), "triangular"),  # broadcast along a leading axis
        ((2, 2), (4, 3, 2), "general"),  # unbatched a, as PyTensor's own rewrite
        ((3, 1, 1, 2, 2), (3, 4, 5, 2), "general"),  # two axes become columns
    ],
)
def test_matrix_b_solve_rewrite_is_exact(a_shape, b_shape, kind, rng):
    a = pt.tensor("a", shape=a_shape)
    b = pt.tensor("b", shape=b_shape)
    if kind == "triangular":
        out = solve_triangular(a, b, lower=True, b_ndim=1)
        a_value = np.tril(rng.normal(size=a_shape)) + 3 * np.eye(a_shape[-1])
    else:
        out = solve(a, b, b_ndim=1)
        a_value = rng.normal(size=a_shape) + 3 * np.eye(a_shape[-1])
    (new,) = _rewritten([out.copy()])
    solves = [
        node.op.core_op
        for node in pytensor.graph.traversal.applys_between([a, b], [new])
        if isinstance(node.op, Blockwise) and isinstance(node.op.core_op, SolveBase)
    ]
    assert [op.b_ndim for op in solves] == [2]
    b_value = rng.normal(size=b_shape)
    mode = pytensor.compile.mode.get_mode("FAST_COMPILE").excluding("specialize")
    expected = pytensor.function([a, b], out, mode=mode)(a_value, b_value)
    actual = pytensor.function([a, b], new, mode=mode)(a_value, b_value)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_matrix_b_solve_rewrite_leaves_batched_a_alone():
    a = pt.tensor("a", shape=(3, 5, 2, 2))
    b = pt.tensor("b", shape=(3, 5, 2))
    out = solve_triangular(a, b, lower=True, b_ndim=1)
    (new,) = _rewritten([out.copy()])
    assert new.owner.inputs[0] is out
