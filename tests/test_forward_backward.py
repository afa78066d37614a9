"""pm_em.forward_backward against brute-force enumeration of every state path, with the C
implementation (default mode) and the NumPy fallback (py linker)."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from pytensor.compile.mode import Mode
from pytensor.gradient import NullTypeGradError
from scipy.special import logsumexp

from pm_em.estep.forward_backward import (
    ForwardBackward,
    ForwardFilter,
    Viterbi,
    forward_backward,
    forward_filter,
    viterbi,
)
from tests.references.brute_force import enumerate_paths, log_posterior_marginals

PY_MODE = Mode(linker="py", optimizer="fast_compile")
# None: PyTensor's default mode (C thunks). "jax": the JAX implementations (lax.scan;
# forward-backward in probability space where that is exact, else in log space);
# "jax-log": forward-backward forced to its log-space form; "jax-parallel": the
# parallel-in-time forward-backward (associative_scan), forced on.
MODES = {"c": None, "py": PY_MODE, "jax": "JAX", "jax-log": "JAX", "jax-parallel": "JAX"}
#: Per JAX mode, the attributes of pm_em.estep.forward_backward_jax set while a call runs.
JAX_FORCED = {
    "jax-parallel": {"_use_parallel": lambda n_steps: True},
    # No probability-space sum is then large enough to be taken as exact.
    "jax-log": {"_FAST_MIN": np.inf},
}


def _compiled(request, inputs, outputs):
    """``outputs`` compiled in the fixture's mode, returning NumPy arrays; skipped
    when this machine cannot compile that mode. For ``jax-parallel`` the JAX
    forward-backward is forced to its parallel form while a call runs (JAX traces a
    function at its first call for each input shape); likewise for ``jax-log``."""
    if request.param == "c" and not pytensor.config.cxx:
        pytest.skip("no C compiler configured")
    if request.param.startswith("jax"):
        jax_impl = pytest.importorskip("pm_em.estep.forward_backward_jax")
    fn = pytensor.function(inputs, outputs, mode=MODES[request.param])

    def call(*args):
        forced = JAX_FORCED.get(request.param, {})
        saved = {name: getattr(jax_impl, name) for name in forced}
        for name, value in forced.items():
            setattr(jax_impl, name, value)
        try:
            return [np.asarray(v) for v in fn(*args)]
        finally:
            for name, value in saved.items():
                setattr(jax_impl, name, value)

    call.fn = fn
    return call


OUTPUT_NAMES = (
    "log_gamma",
    "transition_counts",
    "log_likelihood",
    "log_predictive",
    "path",
    "log_joint",
)


# ---------------------------------------------------------------------------------------
# Brute force
# ---------------------------------------------------------------------------------------


def brute_force(log_emission, log_transition, log_initial):
    """All six outputs of one sequence by enumerating its ``K**T`` paths."""
    T, K = log_emission.shape
    paths, joint = enumerate_paths(log_initial, log_transition, log_emission)
    log_likelihood, log_gamma = log_posterior_marginals(paths, joint, [K] * T)
    with np.errstate(invalid="ignore"):
        posterior = np.exp(joint - log_likelihood)  # NaN if impossible: not compared then
    counts = np.zeros((K, K))
    for t in range(1, T):
        np.add.at(counts, (paths[:, t - 1], paths[:, t]), posterior)

    log_predictive = np.empty((T, K))
    log_predictive[0] = log_initial
    for t in range(1, T):
        prefixes, prefix_joint = enumerate_paths(log_initial, log_transition, log_emission[:t])
        with np.errstate(invalid="ignore"):
            log_predictive[t] = logsumexp(
                prefix_joint[:, None] + log_transition[prefixes[:, -1]], axis=0
            ) - logsumexp(prefix_joint)

    best = int(np.argmax(joint))
    return {
        "log_gamma": np.stack(log_gamma),
        "transition_counts": counts,
        "log_likelihood": log_likelihood,
        "log_predictive": log_predictive,
        "path": paths[best],
        "log_joint": joint[best],
    }


def assert_matches_brute_force(outputs, log_emission, log_transition, log_initial):
    for b in range(log_emission.shape[0]):
        expected = brute_force(log_emission[b], log_transition[b], log_initial[b])
        for name in OUTPUT_NAMES:
            actual = outputs[name][b]
            assert not np.isnan(actual).any(), name
            if name == "path":
                np.testing.assert_array_equal(actual, expected[name], err_msg=name)
            else:
                np.testing.assert_allclose(
                    actual, expected[name], rtol=1e-9, atol=1e-11, err_msg=name
                )


def random_chains(rng, B=2, T=5, K=3):
    """Log emissions, transitions (different per sequence) and initial distributions."""
    log_emission = rng.normal(scale=2.0, size=(B, T, K)) - 1.0
    log_transition = np.log(rng.dirichlet(np.ones(K), size=(B, K)))
    log_initial = np.log(rng.dirichlet(np.ones(K), size=B))
    return log_emission, log_transition, log_initial


# ---------------------------------------------------------------------------------------
# Compiled functions, shared by the tests (C compilation is slow)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(MODES))
def hmm(request):
    """``run(log_emission, log_transition, log_initial) -> dict`` of all six outputs,
    compiled with the C implementation (``"c"``), the NumPy fallback (``"py"``) or JAX."""
    le, lt, li = pt.tensor3("le"), pt.tensor3("lt"), pt.matrix("li")
    outputs = [*forward_backward(le, lt, li), forward_filter(le, lt, li), *viterbi(le, lt, li)]
    fn = _compiled(request, [le, lt, li], outputs)
    if request.param == "c":
        assert all(hasattr(thunk, "cthunk") for thunk in fn.fn.vm.thunks)

    def run(log_emission, log_transition, log_initial):
        return dict(zip(OUTPUT_NAMES, fn(log_emission, log_transition, log_initial)))

    run.mode = request.param
    return run


@pytest.fixture(scope="module", params=list(MODES))
def loglik_grad(request):
    """``run(weights, le, lt, li) -> (loglik, d/dle, d/dlt, d/dli)`` of
    ``sum(weights * log_likelihood)``."""
    weights, le, lt, li = pt.vector("w"), pt.tensor3("le"), pt.tensor3("lt"), pt.matrix("li")
    _, _, log_likelihood = forward_backward(le, lt, li)
    grads = pytensor.grad((weights * log_likelihood).sum(), [le, lt, li])
    return _compiled(request, [weights, le, lt, li], [log_likelihood, *grads])


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


def test_random_chains_match_brute_force(hmm, rng):
    inputs = random_chains(rng)
    outputs = hmm(*inputs)
    assert_matches_brute_force(outputs, *inputs)
    # Non-contiguous inputs (the C code copies them) give the same results.
    strided = hmm(*(np.asfortranarray(x) for x in inputs))
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(strided[name], outputs[name])
    np.testing.assert_allclose(np.exp(outputs["log_gamma"]).sum(axis=2), 1.0, rtol=1e-12)
    np.testing.assert_allclose(outputs["transition_counts"].sum(axis=(1, 2)), 4.0, rtol=1e-12)
    assert outputs["path"].dtype == np.int64


def test_zero_probabilities_match_brute_force(hmm, rng):
    log_emission, log_transition, log_initial = random_chains(rng)
    log_transition[0, 1, 2] = -np.inf  # a zero transition
    log_transition[1, :, 0] = -np.inf  # state 0 can only be the first state
    log_transition[1] -= logsumexp(log_transition[1], axis=1)[:, None]
    log_emission[0, 2, 1] = -np.inf  # an impossible emission
    log_emission[1, 3, :2] = -np.inf  # only state 2 can emit y_3
    log_initial[0, 0] = -np.inf  # a zero initial probability
    outputs = hmm(log_emission, log_transition, log_initial)
    assert_matches_brute_force(outputs, log_emission, log_transition, log_initial)
    assert outputs["transition_counts"][0, 1, 2] == 0.0
    assert np.all(outputs["log_gamma"][1, 1:, 0] == -np.inf)
    np.testing.assert_array_equal(outputs["path"][1, 3], 2)


def test_extreme_finite_values_match_brute_force(hmm, rng):
    # Transition and emission log-probabilities hundreds of nats apart: the C code's
    # probability-space products underflow here and must fall back to log space.
    log_emission, log_transition, log_initial = random_chains(rng)
    log_transition[0] = [[0.0, -900.0, -1200.0], [-800.0, 0.0, -700.0], [-5.0, -1000.0, 0.0]]
    log_transition[1] = [[-1e-300, -800.0, -2000.0], [-850.0, -900.0, 0.0], [0.0, -2.0, -3.0]]
    log_emission[0, :, 1] -= 790.0
    log_emission[1, 2] = [-700.0, 0.0, -1500.0]
    outputs = hmm(log_emission, log_transition, log_initial)
    assert_matches_brute_force(outputs, log_emission, log_transition, log_initial)


def test_impossible_sequence(hmm, rng):
    log_emission, log_transition, log_initial = random_chains(rng)
    log_transition[1, :, 2] = -np.inf
    log_emission[1, 2, :2] = -np.inf  # y_2 needs state 2, which cannot follow any state
    outputs = hmm(log_emission, log_transition, log_initial)
    assert outputs["log_likelihood"][1] == -np.inf
    assert np.all(outputs["log_gamma"][1] == -np.inf)
    np.testing.assert_array_equal(outputs["transition_counts"][1], 0.0)
    # Predictive: normal up to the impossible step, -inf after it.
    expected = brute_force(log_emission[1], log_transition[1], log_initial[1])
    np.testing.assert_allclose(outputs["log_predictive"][1, :3], expected["log_predictive"][:3])
    assert np.all(outputs["log_predictive"][1, 3:] == -np.inf)
    np.testing.assert_array_equal(outputs["path"][1], 0)
    assert outputs["log_joint"][1] == -np.inf
    # The other sequence is unaffected.
    assert_matches_brute_force(
        {name: value[:1] for name, value in outputs.items()},
        log_emission[:1],
        log_transition[:1],
        log_initial[:1],
    )


@pytest.mark.parametrize("where", ["emission", "transition", "initial", "plus_inf"])
def test_invalid_input_gives_nan(hmm, where, rng):
    log_emission, log_transition, log_initial = random_chains(rng)
    if where == "emission":
        log_emission[1, 3, 0] = np.nan
    elif where == "transition":
        log_transition[1, 0, 0] = np.nan
    elif where == "initial":
        log_initial[1, 2] = np.nan
    else:
        log_emission[1, 1, 1] = np.inf
    outputs = hmm(log_emission, log_transition, log_initial)
    for name in ("log_gamma", "transition_counts", "log_likelihood", "log_predictive"):
        assert np.all(np.isnan(outputs[name][1])), name
    assert np.isnan(outputs["log_joint"][1])
    np.testing.assert_array_equal(outputs["path"][1], 0)
    assert_matches_brute_force(
        {name: value[:1] for name, value in outputs.items()},
        log_emission[:1],
        log_transition[:1],
        log_initial[:1],
    )


def test_far_away_data(hmm, rng):
    # Emissions around -1e6 (finite, huge): every output is finite and equals that of the
    # same data shifted by a constant per step, except log p(y), which shifts by the sum.
    log_emission, log_transition, log_initial = random_chains(rng, B=2, T=300, K=3)
    offsets = -1e6 * (1.0 + rng.random(size=(2, 300, 1)))
    far_emission = log_emission + offsets
    far = hmm(far_emission, log_transition, log_initial)
    near = hmm(far_emission - offsets, log_transition, log_initial)  # same rounding
    for name in OUTPUT_NAMES:
        assert np.all(np.isfinite(far[name])), name
    np.testing.assert_allclose(np.exp(far["log_gamma"]).sum(axis=2), 1.0, rtol=1e-12)
    np.testing.assert_allclose(far["log_gamma"], near["log_gamma"], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(
        far["transition_counts"], near["transition_counts"], rtol=1e-8, atol=1e-8
    )
    np.testing.assert_allclose(
        far["log_likelihood"], near["log_likelihood"] + offsets.sum(axis=(1, 2)), rtol=1e-12
    )
    np.testing.assert_allclose(far["log_predictive"], near["log_predictive"], atol=1e-8)
    np.testing.assert_array_equal(far["path"], near["path"])


def test_single_step(hmm, rng):
    log_emission, log_transition, log_initial = random_chains(rng, T=1)
    outputs = hmm(log_emission, log_transition, log_initial)
    assert_matches_brute_force(outputs, log_emission, log_transition, log_initial)
    np.testing.assert_array_equal(outputs["transition_counts"], 0.0)
    np.testing.assert_allclose(
        outputs["log_likelihood"], logsumexp(log_initial + log_emission[:, 0], axis=1)
    )


def test_c_and_fallback_agree_on_a_long_chain(hmm, rng):
    # Both implementations against one NumPy-only reference: the py fixture's result is
    # recomputed here through the Ops' perform methods directly.
    log_emission, log_transition, log_initial = random_chains(rng, B=3, T=400, K=4)
    log_transition[0, 2, :3] = -np.inf
    log_emission[2, 100:120, 1] = -np.inf
    outputs = hmm(log_emission, log_transition, log_initial)
    inputs = (log_emission, log_transition, log_initial)
    reference = {}
    for op, names in (
        (ForwardBackward(), OUTPUT_NAMES[:3]),
        (ForwardFilter(), OUTPUT_NAMES[3:4]),
        (Viterbi(), OUTPUT_NAMES[4:]),
    ):
        node = op.make_node(*inputs)
        storage = [[None] for _ in node.outputs]
        op.perform(node, inputs, storage)
        reference.update(zip(names, (s[0] for s in storage)))
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(outputs[name], reference[name], rtol=1e-9, atol=1e-9)


def test_shape_mismatch_raises(hmm, rng):
    log_emission, log_transition, log_initial = random_chains(rng)
    with pytest.raises(ValueError, match="shapes do not match"):
        hmm(log_emission, log_transition[:1], log_initial)
    with pytest.raises(ValueError, match="at least one step"):
        hmm(log_emission[:, :0], log_transition, log_initial)


def test_log_likelihood_gradient_matches_finite_differences(loglik_grad, rng):
    log_emission, log_transition, log_initial = random_chains(rng, T=6)
    log_transition[1, 0, 1] = -np.inf  # gradient 0 there, no NaN anywhere
    log_emission[0, 3, 2] = -np.inf
    weights = np.array([0.7, -1.3])
    _, *grads = loglik_grad(weights, log_emission, log_transition, log_initial)
    inputs = [log_emission, log_transition, log_initial]
    step = 1e-6
    for position, (x, grad) in enumerate(zip(inputs, grads)):
        assert not np.isnan(grad).any()
        numeric = np.zeros_like(x)
        for index in zip(*np.nonzero(np.isfinite(x))):
            shifted = [v.copy() for v in inputs]
            shifted[position][index] += step
            up = weights @ loglik_grad(weights, *shifted)[0]
            shifted[position][index] -= 2 * step
            down = weights @ loglik_grad(weights, *shifted)[0]
            numeric[index] = (up - down) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)
        assert np.all(grad[np.isneginf(x)] == 0.0)


def test_log_likelihood_gradient_verify_grad(rng):
    inputs = random_chains(rng, T=4)
    pytensor.gradient.verify_grad(
        lambda le, lt, li: forward_backward(le, lt, li)[2], list(inputs), rng=rng
    )


def test_gradient_through_marginals_is_not_implemented():
    le, lt, li = pt.tensor3("le"), pt.tensor3("lt"), pt.matrix("li")
    log_gamma, counts, _ = forward_backward(le, lt, li)
    with pytest.raises(NullTypeGradError, match="log_likelihood output"):
        pytensor.grad(log_gamma.sum(), le)
    with pytest.raises(NullTypeGradError, match="log_likelihood output"):
        pytensor.grad(counts.sum(), lt)


def test_unbatched_transition_and_initial_are_broadcast(rng):
    log_emission, log_transition, log_initial = random_chains(rng)
    le = pt.tensor3("le")
    outputs = forward_backward(le, pt.as_tensor(log_transition[0]), pt.as_tensor(log_initial[0]))
    fn = pytensor.function([le], list(outputs), mode=PY_MODE)
    batched = _forward_backward_reference(
        log_emission, np.stack([log_transition[0]] * 2), np.stack([log_initial[0]] * 2)
    )
    for actual, expected in zip(fn(log_emission), batched):
        np.testing.assert_allclose(actual, expected)


def _forward_backward_reference(log_emission, log_transition, log_initial):
    results = [brute_force(*args) for args in zip(log_emission, log_transition, log_initial)]
    return [np.stack([r[name] for r in results]) for name in OUTPUT_NAMES[:3]]


def test_ops_merge_and_cast():
    assert ForwardBackward() == ForwardBackward()
    assert hash(ForwardFilter()) == hash(ForwardFilter())
    le = pt.tensor3("le", dtype="float32")
    lt, li = pt.tensor3("lt"), pt.matrix("li")
    first = forward_backward(le, lt, li)[2]
    second = forward_backward(le, lt, li)[2]
    assert first.dtype == "float64"
    fn = pytensor.function([le, lt, li], [first, second], mode=PY_MODE)
    assert sum(isinstance(n.op, ForwardBackward) for n in fn.maker.fgraph.apply_nodes) == 1


def test_jax_probability_space_form_is_taken_only_where_exact():
    """The JAX forward-backward runs in probability space (few operations per step)
    only when no sum underflowed; otherwise it falls back to log space."""
    jax_impl = pytest.importorskip("pm_em.estep.forward_backward_jax")
    rng = np.random.default_rng(12)
    log_emission, log_transition, log_initial = random_chains(rng, B=2, T=300, K=3)
    log_transition[1, 0, 2] = -np.inf  # a zero probability alone: still exact
    *scaled, exact = jax_impl._forward_backward_scaled(log_emission, log_transition, log_initial)
    assert bool(exact)
    assert all(v.dtype == np.float64 for v in scaled)  # JAX's float64 is on
    log_space = jax_impl.forward_backward_log_space(log_emission, log_transition, log_initial)
    for name, fast, reference in zip(OUTPUT_NAMES, scaled, log_space):
        np.testing.assert_allclose(fast, reference, rtol=1e-11, atol=1e-11, err_msg=name)
    # State 1 is 1000 nats likelier than the others at one step: their entries
    # underflow there in probability space (log_gamma would be -inf, not -1000).
    log_emission[0, 150] = [-1000.0, 0.0, -1000.0]
    *_, exact = jax_impl._forward_backward_scaled(log_emission, log_transition, log_initial)
    assert not bool(exact)
