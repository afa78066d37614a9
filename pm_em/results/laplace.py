"""Uncertainty at the mode: the Laplace approximation of an EM fit.

EM gives the MAP of the continuous parameters with the discrete latents summed out.
The Laplace approximation adds a Gaussian on the unconstrained space around it, whose
precision is the negative Hessian of the observed-data log-posterior there. The
Hessian is taken by PyTensor autodiff of the same graph EM maximizes
(``EM.graphs.logp``), or, for graphs whose gradient has no gradient (a Markov-chain
latent's forward-backward Op), by central finite differences of the analytic
gradient.

:func:`fit_laplace` takes the InferenceData of a fit; :func:`laplace_idata` is the
same from an :class:`~pm_em.routine.em.EM` object (what ``find_MAP(..., laplace=True)`` calls);
:func:`laplace_approximation` returns the numbers without InferenceData.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import arviz as az
import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import xarray as xr
from pymc.logprob.utils import ParameterValueError
from pytensor.gradient import NullTypeGradError
from pytensor.graph.replace import vectorize_graph
from pytensor.graph.traversal import ancestors

from pm_em.compile import compile_function
from pm_em.mstep.inputs import flatten_params
from pm_em.results.inference_data import LaplaceFit, em_point, with_laplace_groups
from pm_em.routine.em import EM, cached_routine

__all__ = [
    "LaplaceApproximation",
    "NonPositiveCurvatureError",
    "fit_laplace",
    "laplace_approximation",
    "laplace_idata",
    "log_density_derivatives",
]

#: Groups of the input that the Laplace fit replaces; every other group is kept.

# An eigenvalue of -H at most this fraction of the largest is numerically zero: below
# the rounding error of an autodiff Hessian, or the truncation and rounding error of a
# finite-difference one (about 1e-10 relative with the steps below).
_CURVATURE_RTOL = {"autodiff": 1e-12, "finite differences": 1e-8}

# Central differences of the gradient: the step that balances truncation (h^2) and
# rounding (eps / h) errors, relative to the coordinate's magnitude.
_FD_STEP = np.finfo(float).eps ** (1 / 3)

# Newton's decrement g' (-H)^-1 g is the squared distance to the mode in standard
# deviations. Below _NEWTON_TOL the centre is exact to rounding; a centre still
# farther than _NEWTON_ACCEPT after _NEWTON_MAX_STEPS is refused.
_NEWTON_TOL = 1e-16
_NEWTON_ACCEPT = 1e-6
_NEWTON_MAX_STEPS = 30
_NEWTON_MAX_HALVINGS = 40


class NonPositiveCurvatureError(ValueError):
    """The negative Hessian at the mode is not positive definite.

    The point is a saddle (e.g. mixture components that coincide) or a mode on the
    boundary of the parameter space (e.g. a weight at 0, which the unconstrained space
    puts at infinity), and the Laplace approximation does not exist there.

    Attributes
    ----------
    curvatures : np.ndarray
        The offending eigenvalues of ``-H`` (each <= a rounding threshold).
    directions : list of dict
        For each, the eigenvector's largest components, by unconstrained coordinate
        label (as in the ``fit`` group's ``rows``).
    parameters : list of str
        The model variables those coordinates belong to.
    """

    def __init__(self, message, curvatures, directions, parameters):
        super().__init__(message)
        self.curvatures = curvatures
        self.directions = directions
        self.parameters = parameters


@dataclass
class LaplaceApproximation:
    """The Gaussian approximation at a mode, on the unconstrained space.

    Attributes
    ----------
    labels : list of str
        One per unconstrained coordinate, named as pymc-extras names them: the value
        variable's name and the element's coordinates (``"sigma_log__[a]"``), the
        name alone for a scalar.
    em_mode : np.ndarray
        EM's point, flattened (what the ``map`` group holds, unconstrained).
    mode : np.ndarray
        The mode of the log-posterior EM maximized (no Jacobian): EM's point refined
        by Newton steps.
    mean : np.ndarray
        The centre of the Gaussian: ``mode``, or with ``jacobian=True`` the mode of
        the log-density of the unconstrained variables.
    hessian : np.ndarray
        Hessian of the approximated log-density at ``mean``.
    covariance : np.ndarray
        ``inv(-hessian)``.
    standard_errors : dict
        Variable name -> standard errors on the constrained scale, shaped as the
        variable: delta method at ``mode`` with the no-Jacobian Hessian, whatever
        ``jacobian`` (see :func:`laplace_approximation`).
    jacobian : bool
    hessian_method : {"autodiff", "finite differences"}
    newton_steps : int
        Newton steps taken from EM's point to ``mean``, all stages.
    """

    labels: list[str]
    em_mode: np.ndarray
    mode: np.ndarray
    mean: np.ndarray
    hessian: np.ndarray
    covariance: np.ndarray
    standard_errors: dict[str, np.ndarray]
    jacobian: bool
    hessian_method: str
    newton_steps: int
    #: Eigen-decomposition of ``-hessian`` (for exact draws).
    _eigenvalues: np.ndarray = field(repr=False, default=None)
    _eigenvectors: np.ndarray = field(repr=False, default=None)


# -- compiled derivatives, once per EM object --------------------------------------------


@dataclass
class _Compiled:
    """The functions one EM object's Laplace approximations need."""

    labels: list[str]
    #: theta -> (logp, gradient, Hessian); the Hessian is None for a finite-difference
    #: graph (``logp_gradient`` gives the gradient alone then).
    logp_derivatives: object
    hessian_method: str
    #: theta -> (log|J|, gradient, Hessian), or None when no parameter is transformed.
    log_jacobian_derivatives: object
    #: theta -> (constrained values concatenated, their Jacobian d/d theta).
    constrained_jacobian: object
    #: Latent-free Deterministics (name order) that the posterior draws include.
    deterministic_names: list[str]
    #: Why ``jacobian=True`` is impossible for this model, if it is.
    jacobian_error: str | None = None
    #: Compiled on the first draws.
    draws_fn: object = None


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _labels(em: EM) -> list[str]:
    """Coordinate labels of the flat unconstrained vector, as pymc-extras writes its
    ``fit`` group's ``rows``: ``value_name[coord, ...]`` with the model's coords where
    the dim's length matches the value's (a simplex value is one shorter: integers)."""
    coords = em.model.coords
    labels = []
    for p in em.params:
        name = p.value.name
        if not p.value_shape:
            labels.append(name)
            continue
        per_axis = []
        for axis, size in enumerate(p.value_shape):
            dim = p.dims[axis] if p.dims and axis < len(p.dims) else None
            values = coords.get(dim) if dim is not None else None
            if values is not None and len(values) == size:
                per_axis.append(list(values))
            else:
                per_axis.append(list(range(size)))
        labels += [f"{name}[{','.join(map(str, index))}]" for index in itertools.product(*per_axis)]
    return labels


def _log_jacobian_graph(em: EM):
    """``sum log|d constrained / d unconstrained|`` over the transformed parameters,
    as a graph of the value variables (None when nothing is transformed), and why it
    cannot be used, if it cannot."""
    terms = []
    for p in em.params:
        if p.transform is None:
            continue
        log_det = p.transform.log_jac_det(p.value, *p.rv.owner.inputs)
        terms.append(pt.sum(log_det))
    if not terms:
        return None, None
    (log_jacobian,) = em.model.replace_rvs_by_values([pt.add(*terms)])
    latent_values = {lat.value for lat in em.latents}
    if latent_values & set(ancestors([log_jacobian])):
        return None, (
            "A transform of a continuous parameter depends on a latent (e.g. bounds "
            "that change with it): its Jacobian has no value with the latents summed "
            "out. Use jacobian=False."
        )
    return log_jacobian, None


def _compile(em: EM) -> _Compiled:
    compiled = _COMPILED.get(em)
    if compiled is not None:
        return compiled
    kwargs = em.compile_kwargs
    log_jacobian, jacobian_error = _log_jacobian_graph(em)
    constrained = em.graphs.constrained
    theta, flat_graphs = flatten_params(
        em.params,
        [em.graphs.logp, *constrained] + ([log_jacobian] if log_jacobian is not None else []),
    )
    logp = flat_graphs[0]
    flat_constrained = flat_graphs[1 : 1 + len(constrained)]
    gradient = pytensor.grad(logp, theta)
    try:
        hessian = pytensor.gradient.hessian(logp, theta)
    except (NullTypeGradError, NotImplementedError):
        # An Op on the path (forward-backward's C Op) differentiates its output once
        # but not twice: the Hessian comes from differences of the gradient instead.
        hessian = None
    if hessian is not None:
        logp_fn = compile_function([theta], [logp, gradient, hessian], kwargs, em.backend)
        method = "autodiff"

        def logp_derivatives(values):
            value, grad, hess = logp_fn(values)
            return float(value), np.asarray(grad), np.asarray(hess)

    else:
        gradient_fn = compile_function([theta], [logp, gradient], kwargs, em.backend)
        method = "finite differences"

        def logp_derivatives(values):
            value, grad = gradient_fn(values)
            hess = _finite_difference_hessian(lambda t: np.asarray(gradient_fn(t)[1]), values)
            return float(value), np.asarray(grad), hess

    outputs = []
    vector = pt.concatenate([c.ravel().astype("float64") for c in flat_constrained])
    outputs += [vector, pytensor.gradient.jacobian(vector, theta)]
    if log_jacobian is not None:
        flat_log_jacobian = flat_graphs[-1]
        outputs += [
            flat_log_jacobian,
            pytensor.grad(flat_log_jacobian, theta),
            pytensor.gradient.hessian(flat_log_jacobian, theta),
        ]
    transform_fn = compile_function([theta], outputs, kwargs, em.backend)

    def constrained_jacobian(values):
        vector, jac, *_ = transform_fn(values)
        return np.asarray(vector), np.asarray(jac)

    log_jacobian_derivatives = None
    if log_jacobian is not None:

        def log_jacobian_derivatives(values):
            _, _, value, grad, hess = transform_fn(values)
            return float(value), np.asarray(grad), np.asarray(hess)

    latent_values = {lat.value for lat in em.latents}
    deterministic_names = [
        d.name
        for d, graph in zip(em.model.deterministics, em.graphs.deterministics)
        if not latent_values & set(ancestors([graph]))
    ]
    compiled = _Compiled(
        labels=_labels(em),
        logp_derivatives=logp_derivatives,
        hessian_method=method,
        log_jacobian_derivatives=log_jacobian_derivatives,
        constrained_jacobian=constrained_jacobian,
        deterministic_names=deterministic_names,
        jacobian_error=jacobian_error,
    )
    _COMPILED[em] = compiled
    return compiled


def _finite_difference_hessian(gradient, theta: np.ndarray) -> np.ndarray:
    """Central differences of an analytic gradient, symmetrized.

    Each column costs two gradient evaluations; the error is about ``1e-10`` relative
    (``h^2`` truncation against ``eps / h`` rounding, ``h = eps^(1/3) * max(1, |theta|)``).
    """
    steps = _FD_STEP * np.maximum(1.0, np.abs(theta))
    hessian = np.empty((theta.size, theta.size))
    for i, h in enumerate(steps):
        shift = np.zeros_like(theta)
        shift[i] = h
        hessian[:, i] = (gradient(theta + shift) - gradient(theta - shift)) / (2 * h)
    return 0.5 * (hessian + hessian.T)


def log_density_derivatives(em: EM, theta: np.ndarray, *, jacobian: bool = True):
    """Value, gradient and Hessian of the log-density the Laplace approximation uses.

    Parameters
    ----------
    em : EM
    theta : np.ndarray
        The parameters' value variables flattened in ``em.params`` order (as
        :func:`pm_em.mstep.inputs.flatten_params` flattens them).
    jacobian : bool, default True
        Add ``log|J|`` of the transforms (the log-density of the unconstrained
        variables); False: the observed-data log-posterior as EM maximizes it.

    Returns
    -------
    value : float
    gradient : np.ndarray
    hessian : np.ndarray
        By autodiff, or by finite differences of the gradient where the graph has no
        second derivative (``hessian_method`` of :func:`laplace_approximation`).
    """
    compiled = _compile(em)
    if jacobian and compiled.jacobian_error:
        raise ValueError(compiled.jacobian_error)
    theta = np.asarray(theta, dtype="float64")
    value, grad, hess = compiled.logp_derivatives(theta)
    if jacobian and compiled.log_jacobian_derivatives is not None:
        log_det, log_det_grad, log_det_hess = compiled.log_jacobian_derivatives(theta)
        value, grad, hess = value + log_det, grad + log_det_grad, hess + log_det_hess
    return value, grad, 0.5 * (hess + hess.T)


# -- the approximation ---------------------------------------------------------------------


def _check_curvature(em, labels, hessian, method, what, where):
    """Eigen-decomposition of ``-hessian``; raises NonPositiveCurvatureError naming
    the coordinates of every direction with curvature numerically <= 0."""
    if not np.all(np.isfinite(hessian)):
        bad = sorted({labels[i] for i in np.argwhere(~np.isfinite(hessian)).ravel()})
        raise NonPositiveCurvatureError(
            f"The Hessian of {what} is not finite at {where} (entries of {bad}): a "
            "parameter is on the boundary of its support (e.g. a weight or a scale at "
            "0), where the Laplace approximation does not exist.",
            np.array([np.nan]),
            [dict.fromkeys(bad, np.nan)],
            _owners(em, bad),
        )
    eigenvalues, eigenvectors = np.linalg.eigh(-hessian)
    threshold = _CURVATURE_RTOL[method] * max(np.max(np.abs(eigenvalues)), np.finfo(float).tiny)
    flat = eigenvalues <= threshold
    if not flat.any():
        return eigenvalues, eigenvectors
    directions, parts = [], []
    for k in np.flatnonzero(flat):
        vector = eigenvectors[:, k]
        order = np.argsort(-np.abs(vector))
        # The components that make up most of the direction (at least the largest).
        keep = [i for i in order[:5] if abs(vector[i]) >= 0.3 * abs(vector[order[0]])]
        direction = {labels[i]: float(vector[i]) for i in keep}
        directions.append(direction)
        components = ", ".join(f"{name} ({weight:+.2f})" for name, weight in direction.items())
        parts.append(f"curvature {eigenvalues[k]:.3g} along {components}")
    names = _owners(em, [name for d in directions for name in d])
    raise NonPositiveCurvatureError(
        f"The negative Hessian of {what} at {where} is not positive definite "
        f"(largest curvature {np.max(eigenvalues):.3g}): " + "; ".join(parts) + ". "
        f"The point is a saddle (e.g. mixture components that coincide) or a mode on "
        f"the boundary (e.g. a weight at 0), where {names} are not determined to second "
        "order, so the Laplace approximation does not exist there. Refit from other "
        "starts (n_init), or give priors that keep the mode inside the support.",
        eigenvalues[flat],
        directions,
        names,
    )


def _owners(em, labels) -> list[str]:
    """Model variables of unconstrained coordinate labels, in ``em.params`` order."""
    stems = {label.split("[")[0] for label in labels}
    return [p.name for p in em.params if p.value.name in stems]


def _newton(em, derivatives, theta, labels, method, what, start):
    """Newton steps from ``theta`` to the mode of ``derivatives``' log-density.

    Each step must not lower the log-density (halved until it does); every Hessian on
    the way must be negative definite. Returns the mode, its Hessian's
    eigen-decomposition and the number of steps.
    """
    value, grad, hess = derivatives(theta)
    eigenvalues, eigenvectors = _check_curvature(em, labels, hess, method, what, start)
    for step in range(_NEWTON_MAX_STEPS + 1):
        # The ascent direction (-H)^-1 g, by the eigen-decomposition already at hand.
        direction = eigenvectors @ ((eigenvectors.T @ grad) / eigenvalues)
        decrement = float(grad @ direction)
        if decrement <= _NEWTON_TOL or step == _NEWTON_MAX_STEPS:
            break
        # Rounding in a sum over all observations: a step that loses less than this
        # is not worse.
        slack = 1e-12 * max(1.0, abs(value))
        for _ in range(_NEWTON_MAX_HALVINGS):
            candidate = theta + direction
            try:
                new_value, new_grad, new_hess = derivatives(candidate)
            except ParameterValueError:
                # Outside the support (a covariance no longer numerically positive
                # definite): a log-density of -inf, so the step is halved.
                new_value = -np.inf
            if np.isfinite(new_value) and new_value >= value - slack:
                break
            direction = 0.5 * direction
        else:
            break  # no step keeps the log-density: as close as rounding allows
        theta, value, grad, hess = candidate, new_value, new_grad, new_hess
        eigenvalues, eigenvectors = _check_curvature(
            em, labels, hess, method, what, f"Newton step {step + 1} from {start}"
        )
    if decrement > _NEWTON_ACCEPT:
        raise ValueError(
            f"Newton steps from EM's point did not reach a mode of {what} (remaining "
            f"distance {np.sqrt(decrement):.3g} standard deviations after {step} steps); "
            "the density may have no mode there (with jacobian=True, try jacobian=False)."
        )
    return theta, hess, eigenvalues, eigenvectors, step


def _standard_errors(em, compiled, mode, eigenvalues, eigenvectors) -> dict[str, np.ndarray]:
    """Delta method: ``sqrt(diag(J C J'))`` with ``J = d constrained / d theta``."""
    _, jac = compiled.constrained_jacobian(mode)
    # J C J' with C = V diag(1/lambda) V', as (J V / sqrt(lambda)) squared, row sums.
    scaled = (jac @ eigenvectors) / np.sqrt(eigenvalues)
    se = np.sqrt(np.sum(scaled**2, axis=1))
    out, offset = {}, 0
    for p in em.params:
        size = int(np.prod(p.shape, dtype=int))
        out[p.name] = se[offset : offset + size].reshape(p.shape)
        offset += size
    return out


def laplace_approximation(em: EM, point, *, jacobian: bool = True) -> LaplaceApproximation:
    """The Laplace approximation at EM's mode ``point``.

    Parameters
    ----------
    em : EM
    point : dict
        EM's MAP: each continuous free variable by name, constrained space.
    jacobian : bool, default True
        True: the Gaussian approximates the density of the unconstrained variables,
        ``log p(theta(u) | x) + log|d theta / d u|``, the usual Laplace
        approximation on the unconstrained space (Stan's ``laplace`` method, whose
        default this is, with the mode also found with the Jacobian). Pushed
        through the transforms, its draws then approximate the posterior of the
        constrained variables, which is what they are compared with (MCMC draws).
        False: the Gaussian approximates the log-posterior EM maximized (no
        Jacobian) as a function of ``u``; at its mode, its covariance pushed through
        the transforms by the delta method is the inverse observed information in
        the model's own parameterization. (pymc-extras 0.10's ``fit_laplace`` takes
        both its mode and its Hessian without Jacobian: ``jacobian=False`` here.)

    Returns
    -------
    LaplaceApproximation

    Notes
    -----
    **Centre.** EM's mode maximizes the log-posterior without Jacobian. It is first
    refined by Newton steps on that log-posterior (EM stops on a tolerance on the
    change of the log-posterior, which can leave it a noticeable part of a standard
    deviation short when EM converges slowly; Newton's steps make the gradient zero
    to rounding). With ``jacobian=True`` Newton steps continue on the Jacobian-adjusted
    log-density to its own mode, the unconstrained-space mode, so that the Gaussian
    is centred where its density peaks (e.g. ``log sigma`` at the mode of
    ``p(sigma | x) * sigma``, not at ``log`` of the MAP). The ``map`` group keeps
    EM's point as EM returned it.

    **Hessian.** Autodiff of ``EM.graphs.logp`` (latents summed out, priors
    included) on the flat unconstrained vector. Where the graph has a first but no
    second derivative (Markov-chain latents: the forward-backward Op), central
    differences of the analytic gradient, symmetrized; ``hessian_method`` says which.

    **Standard errors** (``standard_errors``) are on the constrained scale, by the
    delta method at the no-Jacobian mode with the no-Jacobian Hessian, whatever
    ``jacobian``: there they equal the inverse observed information of the model's
    own parameters, whichever transform PyMC chose, so they are the standard errors
    of the MAP estimate.

    Raises
    ------
    NonPositiveCurvatureError
        When ``-H`` is not positive definite at a mode: a saddle point, or a mode on
        the boundary (a weight at 0). The message names the parameters along the
        offending directions.
    """
    compiled = _compile(em)
    if jacobian and compiled.jacobian_error:
        raise ValueError(compiled.jacobian_error)
    labels = compiled.labels
    em_mode = np.concatenate([np.asarray(v, dtype="float64").ravel() for v in em.to_values(point)])
    method = compiled.hessian_method

    def newton(theta, with_jacobian, what, start):
        def derivatives(t):
            return log_density_derivatives(em, t, jacobian=with_jacobian)

        return _newton(em, derivatives, theta, labels, method, what, start)

    mode, hess, eigenvalues, eigenvectors, steps = newton(
        em_mode, False, "the observed-data log-posterior", "EM's point"
    )
    standard_errors = _standard_errors(em, compiled, mode, eigenvalues, eigenvectors)
    mean = mode
    if jacobian and compiled.log_jacobian_derivatives is not None:
        mean, hess, eigenvalues, eigenvectors, more_steps = newton(
            mode,
            True,
            "the log-density of the unconstrained parameters (Jacobian included)",
            "the no-Jacobian mode",
        )
        steps += more_steps
    covariance = eigenvectors @ (eigenvectors.T / eigenvalues[:, None])
    return LaplaceApproximation(
        labels=labels,
        em_mode=em_mode,
        mode=mode,
        mean=mean,
        hessian=hess,
        covariance=0.5 * (covariance + covariance.T),
        standard_errors=standard_errors,
        jacobian=bool(jacobian),
        hessian_method=method,
        newton_steps=steps,
        _eigenvalues=eigenvalues,
        _eigenvectors=eigenvectors,
    )


# -- draws -----------------------------------------------------------------------------------


def _draws_function(em: EM, compiled: _Compiled):
    """Flat unconstrained draws ``(n_draws, n)`` -> each parameter (constrained) and each
    latent-free Deterministic, with a leading draw axis. Vectorized when PyTensor can
    vectorize the graphs, else one draw at a time."""
    if compiled.draws_fn is not None:
        return compiled.draws_fn
    deterministics = dict(zip((d.name for d in em.model.deterministics), em.graphs.deterministics))
    outputs = [*em.graphs.constrained, *(deterministics[n] for n in compiled.deterministic_names)]
    kwargs = em.compile_kwargs
    batch = pt.matrix("theta_draws", dtype="float64")
    replace, offset = {}, 0
    for p in em.params:
        piece = batch[:, offset : offset + p.value_size]
        replace[p.value] = piece.reshape((batch.shape[0], *p.value_shape)).astype(
            p.value.type.dtype
        )
        offset += p.value_size
    try:
        fn = compile_function([batch], vectorize_graph(outputs, replace), kwargs, em.backend)

        def draws_fn(thetas):
            return [np.asarray(v) for v in fn(thetas)]

    except (NotImplementedError, TypeError, ValueError):
        # An op without a vectorized form: one draw at a time.
        theta, flat_outputs = flatten_params(em.params, outputs)
        single = compile_function([theta], flat_outputs, kwargs, em.backend)

        def draws_fn(thetas):
            per_draw = [single(t) for t in thetas]
            return [np.stack([np.asarray(d[i]) for d in per_draw]) for i in range(len(outputs))]

    compiled.draws_fn = draws_fn
    return draws_fn


def _sample(em, compiled, approx: LaplaceApproximation, draws, random_seed):
    rng = np.random.default_rng(random_seed)
    noise = rng.standard_normal((draws, approx.mean.size))
    # u = mean + V diag(lambda^-1/2) e has covariance V diag(1/lambda) V' = inv(-H).
    thetas = approx.mean + (noise / np.sqrt(approx._eigenvalues)) @ approx._eigenvectors.T
    values = _draws_function(em, compiled)(thetas)
    names = [p.name for p in em.params] + compiled.deterministic_names
    return dict(zip(names, values))


def _point(em, source: xr.Dataset) -> dict[str, np.ndarray]:
    missing = [p.name for p in em.params if p.name not in source]
    if missing:
        raise ValueError(
            f"idata holds no value of {missing}: it is not an EM fit of this model "
            f"(its variables: {sorted(source.data_vars)})."
        )
    point = {}
    for p in em.params:
        array = source[p.name]
        point[p.name] = np.asarray(array.isel(chain=0, draw=0).values).reshape(p.shape)
    return point


def _check_options(draws, jacobian):
    if not (isinstance(draws, int | np.integer) and draws >= 1):
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}.")
    if not isinstance(jacobian, bool | np.bool_):
        raise ValueError(f"jacobian must be True or False, got {jacobian!r}.")


def laplace_idata(
    em: EM,
    idata: az.InferenceData,
    *,
    draws: int = 1000,
    random_seed=None,
    jacobian: bool = True,
) -> az.InferenceData:
    """The Laplace approximation at the MAP of an EM fit, as a new InferenceData.

    What :func:`fit_laplace` does, given the compiled EM routine (``find_MAP`` calls
    this with its own). ``idata`` is not modified.

    Parameters
    ----------
    em : EM
        The routine that produced ``idata``.
    idata : az.InferenceData
        An EM fit: its ``posterior`` (or ``map``, for a Laplace fit) holds the MAP.
    draws, random_seed, jacobian
        See :func:`fit_laplace`.

    Returns
    -------
    az.InferenceData
        See :func:`fit_laplace`.
    """
    _check_options(draws, jacobian)
    approx = laplace_approximation(em, _point(em, em_point(idata)), jacobian=bool(jacobian))
    compiled = _compile(em)
    samples = _sample(em, compiled, approx, int(draws), random_seed)
    return with_laplace_groups(idata, em.model, samples, _fit_group(approx))


def _fit_group(approx: LaplaceApproximation) -> LaplaceFit:
    return LaplaceFit(
        labels=approx.labels,
        mean=approx.mean,
        covariance=approx.covariance,
        standard_errors=approx.standard_errors,
        attrs={
            "jacobian": int(approx.jacobian),
            "hessian_method": approx.hessian_method,
            "newton_steps": approx.newton_steps,
            "standard_errors": "delta method at the no-Jacobian mode (<name>_se)",
        },
    )


def _routine_for(model, source: xr.Dataset, backend=None) -> EM:
    """The model's EM routine for the latents that ``source`` reports (``lp_<name>``),
    compiled with ``backend`` (the fit's, when it recorded one)."""
    discrete = [rv.name for rv in model.free_RVs if rv.type.dtype.startswith(("int", "uint"))]
    latents = [name for name in discrete if f"lp_{name}" in source]
    return cached_routine(model, None if latents == discrete else latents, backend=backend)


def fit_laplace(
    idata: az.InferenceData,
    model=None,
    draws: int = 1000,
    random_seed=None,
    jacobian: bool = True,
) -> az.InferenceData:
    """Laplace approximation at the MAP of an EM fit: uncertainty at the mode.

    A Gaussian on the unconstrained space, centred at the mode and with covariance
    ``inv(-H)``, ``H`` the Hessian of the observed-data log-posterior (latents summed
    out, priors included) there; ``draws`` from it pushed through the transforms.

    Parameters
    ----------
    idata : az.InferenceData
        The result of :func:`pm_em.find_MAP` on ``model`` (or of a previous
        ``fit_laplace``: its ``map`` group is used). Not modified.
    model : pm.Model, optional
        The model; by default the one of the ``with`` context.
    draws : int, default 1000
        Number of draws from the approximation.
    random_seed : int or np.random.Generator, optional
        Seeds the draws.
    jacobian : bool, default True
        True (default): approximate the density of the unconstrained variables,
        Jacobian of the transforms included, so that the draws, pushed through the
        transforms, approximate the posterior (the usual Laplace approximation on
        the unconstrained space; comparable with MCMC draws). The Gaussian is then
        centred at the unconstrained-space mode, reached by Newton steps from EM's
        mode (which has no Jacobian). False: approximate the log-posterior EM
        maximized, centred at EM's mode. See :func:`laplace_approximation`.

    Returns
    -------
    az.InferenceData
        A new object with:

        - ``posterior``: the draws, dims ``(chain=1, draw=draws, *dims)``, model
          coords: every continuous free variable and every Deterministic that does
          not depend on a latent. (Those that do are left out: the approximation has
          the latents summed out, so it gives them no value; the ``map`` group holds
          them at the most probable latent values.)
        - ``map``: EM's ``posterior`` as it was (the MAP, the latents' most probable
          values and ``lp_<latent>``), dims ``(chain=1, draw=1, ...)``.
        - ``fit``: as pymc-extras lays out its Laplace ``fit`` group: ``mean_vector``
          (dim ``rows``) and ``covariance_matrix`` (``rows``, ``columns``) on the
          unconstrained space, labelled ``value_name[coords]``; plus ``<name>_se``
          for each continuous free variable, the standard errors of the MAP on the
          constrained scale, shaped and dimmed as the variable (delta method at the
          no-Jacobian mode, whatever ``jacobian``); attrs ``jacobian`` (0/1),
          ``hessian_method`` (``"autodiff"`` or ``"finite differences"``) and
          ``newton_steps``.
        - every other group of ``idata`` (``log_likelihood``, ``em_stats``,
          ``observed_data``, ``constant_data``), unchanged.

    Raises
    ------
    NonPositiveCurvatureError
        A ``ValueError``: ``-H`` is not positive definite at the mode (a saddle, or a
        mode on the boundary such as a weight at 0); the message names the
        parameters along the offending directions.
    ValueError
        When ``idata`` is not an EM fit of ``model``, or for invalid options.

    Notes
    -----
    For a Markov-chain latent the Hessian is by central finite differences of the
    analytic gradient (the forward-backward Op has no second derivative);
    ``fit.attrs["hessian_method"]`` says so.

    Examples
    --------
    >>> with model:  # doctest: +SKIP
    ...     idata = pm_em.find_MAP(random_seed=1)
    ...     laplace = fit_laplace(idata, draws=2000, random_seed=2)
    >>> az.summary(laplace)  # doctest: +SKIP
    >>> laplace.fit["mu_se"]  # doctest: +SKIP
    """
    model = pm.modelcontext(model)
    _check_options(draws, jacobian)
    # The fit's backend (recorded in em_stats), so that its routine is reused.
    backend = idata.em_stats.attrs.get("backend") if "em_stats" in idata.groups() else None
    em = _routine_for(model, em_point(idata), backend)
    return laplace_idata(em, idata, draws=draws, random_seed=random_seed, jacobian=jacobian)
