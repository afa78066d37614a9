"""The EM routine of a model, compiled once, usable a step at a time."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from pytensor.graph.traversal import ancestors

from pm_em.analysis import analyze_model
from pm_em.chains import model_initial_point
from pm_em.compile import compile_function, resolve_backend
from pm_em.data import DataBinding, recording_reads
from pm_em.diagnostics import check_observed_data, explain_nonfinite_logp, model_or_context
from pm_em.graphs import build_em_graphs
from pm_em.implicit import explicit_model
from pm_em.loop import EMHistory, EMState, run_em
from pm_em.mstep import join_flat, split_flat
from pm_em.pointwise import direct_pointwise, pointwise_graphs, pointwise_loglik
from pm_em.support import minimize_within_support, outside_support_as_inf

__all__ = ["EM", "FitResult", "LogResponsibilities", "cached_routine"]

_log = logging.getLogger("pm_em")


def _report_degenerate_structure(structure, unused_params=()) -> None:
    """Say once (INFO) when EM has nothing to enumerate, a latent nothing to learn
    from, or a parameter nothing to be estimated from: valid models, just not what
    one usually means."""
    if not structure.latents:
        _log.info(
            "The model has no discrete latent: EM reduces to maximizing its log-posterior "
            "(plain MAP, no Jacobian)."
        )
    for latent in structure.latents:
        dependents = [t for t in structure.terms if latent.name in t.latents]
        if all(t.name == latent.name for t in dependents):
            _log.info(
                "Latent '%s' has no dependents: nothing observed depends on it, so its "
                "posterior is its prior.",
                latent.name,
            )
    for param in unused_params:
        _log.info(
            "Parameter '%s' enters no term of the log-posterior (a Flat prior, and "
            "nothing observed depends on it): it has no mode, every value is as good, so "
            "its MAP is undefined. EM leaves it at its start value.",
            param.name,
        )


# Compiled routines per model, shared by every EM object and find_MAP call, so that
# repeated fits (restarts, other starts) never recompile. Keyed weakly: the cache
# goes with the model.
_ROUTINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _routine_key(model, latent_vars, compile_kwargs, backend) -> tuple:
    return (
        tuple(latent_vars) if latent_vars is not None else None,
        repr(sorted((compile_kwargs or {}).items())),
        backend,
        tuple(model.named_vars),
    )


def cached_routine(model, latent_vars=None, compile_kwargs=None, backend=None) -> EM:
    """The model's compiled EM routine: the one already built (by :class:`EM` or a
    previous fit) for these options, unless the data it was built for changed shape
    or structure (then a new one)."""
    backend = resolve_backend(backend, compile_kwargs)
    key = _routine_key(model, latent_vars, compile_kwargs, backend)
    routine = _ROUTINES.get(model, {}).get(key)
    if routine is None or routine.data.refresh() is not None:
        routine = EM(model, latent_vars=latent_vars, compile_kwargs=compile_kwargs, backend=backend)
    return routine


# The M-step's inner optimizer must be far more precise than the EM tolerance, or EM
# stalls on the optimizer's noise instead of converging.
_MSTEP_OPTIONS = {"maxiter": 500, "ftol": 0.0, "gtol": 1e-10, "maxcor": 20}


def _polish(negative, theta: np.ndarray, n_steps: int = 3) -> np.ndarray:
    """Newton steps on the gradient alone, after L-BFGS.

    Near the maximum, changes of Q fall below the rounding error of a sum over all
    observations, so L-BFGS's line search stops early (its termination is decided on
    Q's value). The gradient stays accurate there: a few Newton steps with a
    finite-difference Hessian of the gradient make the M-step exact, which EM's
    convergence (and agreement with closed-form references) needs. A step is kept
    only if it shrinks the gradient; ``negative`` returns a NaN gradient outside the
    support (:func:`~pm_em.support.outside_support_as_inf`), which is never kept.
    """
    _, grad = negative(theta)
    for _ in range(n_steps):
        if not np.all(np.isfinite(grad)) or np.max(np.abs(grad), initial=0.0) < 1e-13:
            break
        steps = 1e-6 * (1.0 + np.abs(theta))
        hessian = np.empty((theta.size, theta.size))
        for i, h in enumerate(steps):
            shift = np.zeros_like(theta)
            shift[i] = h
            hessian[:, i] = (negative(theta + shift)[1] - negative(theta - shift)[1]) / (2 * h)
        hessian = 0.5 * (hessian + hessian.T)
        if not np.all(np.isfinite(hessian)):
            break  # a difference step left the support: leave L-BFGS's answer
        try:
            np.linalg.cholesky(hessian)
        except np.linalg.LinAlgError:
            break  # not locally convex: leave L-BFGS's answer
        candidate = theta - np.linalg.solve(hessian, grad)
        _, candidate_grad = negative(candidate)
        if not np.linalg.norm(candidate_grad) < np.linalg.norm(grad):
            break
        theta, grad = candidate, candidate_grad
    return theta


#: Rows per block when a function of an (n, K) table is taken block by block: a
#: few MB of temporaries, whatever n.
_BLOCK_ROWS = 1 << 16


def most_probable(log_resp: np.ndarray, support: np.ndarray, dtype) -> np.ndarray:
    """The most probable support value per element, ``log_resp.shape[:-1]``.

    ``np.argmax`` along the last axis copies its input whole when that axis is not
    contiguous (the E-step's responsibilities are a transposed view of its ``(K, n)``
    table); block by block over the leading axis, only a block is copied.
    """
    log_resp = np.asarray(log_resp)
    support = np.asarray(support).astype(dtype, copy=False)
    if log_resp.ndim == 1:
        return np.asarray(support[np.argmax(log_resp)])
    labels = np.empty(log_resp.shape[:-1], dtype=dtype)
    for start in range(0, log_resp.shape[0], _BLOCK_ROWS):
        block = slice(start, start + _BLOCK_ROWS)
        labels[block] = support[np.argmax(log_resp[block], axis=-1)]
    return labels


class LogResponsibilities(dict):
    """Latent name -> log responsibilities, as returned by :meth:`EM.e_step`.

    A plain ``dict`` for the user; it also carries the joint tables the M-step needs
    when several latents are enumerated together (``joint``), so that passing it back
    to :meth:`EM.m_step` is exact.
    """

    def __init__(
        self, marginals, joint, closed_form=None, stats=None, at_values=None, transitions=None
    ):
        super().__init__(marginals)
        self.joint = joint
        #: Markov-chain latent name -> expected transition counts ``(*batch, K, K)``:
        #: entry ``[..., j, k]`` is the expected number of ``j -> k`` steps.
        self.transition_counts = transitions or {}
        # The closed-form M-step blocks and the numeric block's statistics, computed
        # in the same call as the E-step, and the parameter values of that call
        # (they hold for that point only).
        self.closed_form = closed_form
        self.stats = stats
        self.at_values = at_values


@dataclass
class FitResult:
    """Everything a fit returns, before it becomes InferenceData."""

    point: dict[str, np.ndarray]
    deterministics: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    log_resp: LogResponsibilities
    pointwise: dict[str, np.ndarray]
    logp: float
    history: EMHistory
    #: Every start's history (the fit's own alone when there was one start).
    restarts: list[EMHistory] = field(default_factory=list)
    best_restart: int = 0


class EM:
    """EM for the MAP of a PyMC model with finite discrete latent variables.

    The routine is derived from the model's graph and compiled once at construction;
    the methods run it a step at a time (as the EM lecture notes do by hand), and
    :func:`pm_em.find_MAP` runs it to convergence.

    Parameters
    ----------
    model : pm.Model, optional
        The model; by default the one of the ``with`` context.
    latent_vars : list of str, optional
        Names of the latents to enumerate; by default every discrete free variable.
    compile_kwargs : dict, optional
        Passed to :func:`pytensor.function`.
    backend : {"c", "jax"}, optional
        What compiles the routine: ``"jax"`` (the default: JAX/XLA, seconds for a new
        model) or ``"c"`` (PyTensor's C backend, cached on disk; the default when JAX
        cannot be imported). ``PM_EM_BACKEND`` in the environment sets the default.
    closed_form : bool, default True
        Update in closed form every parameter whose pattern is recognized (see
        :attr:`closed_form_params`); False sends all to the numeric M-step (slower,
        for checking).

    Raises
    ------
    UnsupportedModelError
        When a latent cannot be enumerated exactly; the message says why and what to do.

    Examples
    --------
    >>> em = pm_em.EM(model)  # doctest: +SKIP
    >>> point = em.initial_point(random_seed=1)  # doctest: +SKIP
    >>> for _ in range(50):  # doctest: +SKIP
    ...     point = em.m_step(point, em.e_step(point))
    """

    def __init__(
        self,
        model=None,
        *,
        latent_vars=None,
        compile_kwargs=None,
        backend=None,
        closed_form=True,
    ):
        user_latent_vars = latent_vars
        #: The backend compiling every function of the routine (:mod:`pm_em.compile`).
        self.backend = resolve_backend(backend, compile_kwargs)
        #: The model as given; ``model`` is the one EM runs on: the same, or a copy
        #: with the labels of observed mixture distributions written out.
        self.user_model = model_or_context(model)
        explicit = explicit_model(self.user_model)
        self.model = explicit.model
        #: Label latent name -> the observed mixture variable it belongs to.
        self.implicit_labels = {latent: observed for observed, latent in explicit.labels.items()}
        if latent_vars is not None and explicit.labels:
            latent_vars = [*latent_vars, *self.implicit_labels]
        # Every pm.Data value read while the routine is derived may shape it (an index
        # deciding which latent element an observation depends on, a constant in a
        # closed form): recorded, so that new values make the routine stale.
        with recording_reads() as build_reads:
            self.structure = analyze_model(self.model, latent_vars)
            self.graphs = graphs = build_em_graphs(self.structure, closed_form=closed_form)
        self.params = self.structure.params
        self.latents = self.structure.latents
        _report_degenerate_structure(self.structure, graphs.unused_params)

        # In the order of the M-step's responsibility inputs (ResponsibilityInputs.flat).
        posterior_outputs = []
        self._transition_slots = {}
        # Latent name -> (slot of the joint output, shape) for the responsibilities
        # that are a group's log W as it is: returned as a view of that output, not
        # as a second (n x K) output of every E-step.
        self._resp_views = {}
        shapes = {lat.name: (*lat.shape, lat.n_support) for lat in self.structure.latents}
        for comp, post in zip(self.structure.components, graphs.posteriors):
            posterior_outputs.append(post.log_q_global)
            for name, index in post.resp_is_group.items():
                self._resp_views[name] = (len(posterior_outputs) + index, shapes[name])
            posterior_outputs += post.log_w_groups
            if post.transition_counts is not None:
                self._transition_slots[comp.chain.name] = (len(posterior_outputs), comp.chain)
                posterior_outputs.append(post.transition_counts)
        self._resp_order = [n for post in graphs.posteriors for n in post.log_resp]
        self._marginal_names = [n for n in self._resp_order if n not in self._resp_views]
        marginals = [
            post.log_resp[n]
            for post in graphs.posteriors
            for n in post.log_resp
            if n not in self._resp_views
        ]
        self._n_joint = len(posterior_outputs)
        self._n_marginals = len(marginals)
        # One call per EM iteration: the E-step and every closed-form block.
        self._e_step_fn = compile_function(
            graphs.values,
            [graphs.logp, *posterior_outputs, *marginals, *graphs.closed_step, *graphs.stats_step],
            compile_kwargs,
            self.backend,
        )
        names = [p.name for p in self.params]
        self._closed_index = [names.index(p.name) for p in graphs.closed_params]
        self._numeric_index = [names.index(p.name) for p in graphs.numeric_params]
        self._objective_fn = None
        if graphs.numeric_params:
            outputs = [graphs.objective, graphs.gradient]
            fixed = [
                *(p.value for p in graphs.closed_params),
                *graphs.responsibilities.flat,
                *graphs.numeric.stat_inputs,
            ]
            # Inputs the objective does not read (the responsibilities, once every
            # term is on statistics) are not passed: PyTensor checks each input.
            used = set(ancestors(outputs))
            self._objective_uses = [v in used for v in fixed]
            self._objective_fn = compile_function(
                [graphs.theta_flat, *(v for v in fixed if v in used)],
                outputs,
                compile_kwargs,
                self.backend,
            )
        self._closed_form_fn = None
        self._stats_fn = None
        self._constrained_fn = compile_function(
            graphs.values, graphs.constrained, compile_kwargs, self.backend
        )
        self._unconstrained_fn = compile_function(
            graphs.constrained_inputs, graphs.unconstrained, compile_kwargs, self.backend
        )
        self._compile_kwargs = compile_kwargs
        self._result_fn = None
        self._result_layout = None
        self._chain_fn = None
        #: The data this routine was built for (:mod:`pm_em.data`).
        self.data = DataBinding(self.user_model, self.model, build_reads)
        if closed_form:
            _ROUTINES.setdefault(self.user_model, {})[
                _routine_key(self.user_model, user_latent_vars, compile_kwargs, self.backend)
            ] = self

    # -- conversions -----------------------------------------------------------------

    def to_values(self, point: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Constrained point (by variable name) -> value-variable arrays."""
        stale = self.data.refresh()
        if stale is not None:
            raise ValueError(f"{stale} Build a new pm_em.EM(model); find_MAP rebuilds by itself.")
        missing = [p.name for p in self.params if p.name not in point]
        if missing:
            raise ValueError(f"point is missing values for {missing}.")
        constrained = []
        for p in self.params:
            value = np.asarray(point[p.name], dtype=p.rv.type.dtype)
            if value.shape != p.shape:
                raise ValueError(f"point['{p.name}'] has shape {value.shape}, expected {p.shape}.")
            constrained.append(value)
        return [np.asarray(v) for v in self._unconstrained_fn(*constrained)]

    def to_point(self, values: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Value-variable arrays -> constrained point (by variable name)."""
        constrained = self._constrained_fn(*values)
        return {p.name: np.asarray(v) for p, v in zip(self.params, constrained)}

    # -- the steps -------------------------------------------------------------------

    def initial_point(self, random_seed=None) -> dict[str, np.ndarray]:
        """A start for EM: the model's initial point, jittered on the unconstrained space.

        The model's default point puts e.g. all mixture means at the same value, a
        symmetric point EM can never leave; a uniform(-1, 1) jitter of the
        unconstrained values, reproducible from ``random_seed``, breaks the symmetry.

        Parameters
        ----------
        random_seed : int or np.random.Generator, optional

        Returns
        -------
        dict
            Continuous free variable name -> value, constrained space.
        """
        rng = np.random.default_rng(random_seed)
        start = model_initial_point(self.model, random_seed=int(rng.integers(2**31)))
        values = [
            np.asarray(start[p.value.name]) + rng.uniform(-1, 1, size=p.value_shape)
            for p in self.params
        ]
        return self.to_point(values)

    def e_step(self, point: Mapping[str, np.ndarray]) -> LogResponsibilities:
        """Log responsibilities of every latent at ``point``.

        Returns
        -------
        LogResponsibilities
            Latent name -> array shaped ``latent.shape + (n_support,)`` (for a Markov
            chain: the log state marginals ``log p(s_t = k | data)``); its
            ``transition_counts`` attribute maps each chain to its expected transition
            counts ``(*batch, K, K)``, and ``joint`` holds the joint tables for
            :meth:`m_step`.
        """
        return self._e_step_values(self.to_values(point))[1]

    @property
    def closed_form_params(self) -> list[str]:
        """Names of the parameters the M-step updates in closed form (the others are
        maximized numerically, given those)."""
        return [p.name for p in self.graphs.closed_params]

    def _e_step_values(self, values):
        logp, *rest = self._e_step_fn(*values)
        joint = [np.asarray(a) for a in rest[: self._n_joint]]
        end = self._n_joint + self._n_marginals
        computed = dict(
            zip(self._marginal_names, (np.asarray(a) for a in rest[self._n_joint : end]))
        )
        marginals = {}
        for name in self._resp_order:
            if name in self._resp_views:
                slot, shape = self._resp_views[name]
                # A view of the group's table: (1, K, n) -> (*latent.shape, K).
                marginals[name] = joint[slot][0].T.reshape(shape)
            else:
                marginals[name] = computed[name]
        n_closed = len(self.graphs.closed_step)
        closed = [np.asarray(a) for a in rest[end : end + n_closed]]
        stats = [np.asarray(a) for a in rest[end + n_closed :]]
        transitions = {
            name: joint[slot].reshape((*chain.batch_shape, chain.n_states, chain.n_states))
            for name, (slot, chain) in self._transition_slots.items()
        }
        return float(logp), LogResponsibilities(
            marginals, joint, closed, stats, values, transitions
        )

    def m_step(self, point: Mapping[str, np.ndarray], log_resp) -> dict[str, np.ndarray]:
        """The next point: the maximizer of the expected complete-data log-posterior.

        Parameters
        ----------
        point : dict
            Current point (warm start), constrained space.
        log_resp : LogResponsibilities or dict
            From :meth:`e_step`. A plain dict of marginals is accepted when every
            latent is enumerated on its own.
        """
        values = self.to_values(point)
        if not isinstance(log_resp, LogResponsibilities):
            log_resp = LogResponsibilities(log_resp, self._joint_tables(log_resp))
        elif log_resp.at_values is None or not all(
            np.array_equal(a, b) for a, b in zip(values, log_resp.at_values)
        ):
            # Its closed-form blocks belong to the point of its E-step, not this one.
            log_resp = LogResponsibilities(
                log_resp, log_resp.joint, transitions=log_resp.transition_counts
            )
        return self.to_point(self._m_step_values(values, log_resp))

    def _joint_tables(self, log_resp) -> list[np.ndarray]:
        tables = []
        for comp in self.structure.components:
            if comp.chain is not None:
                raise ValueError(
                    f"'{comp.chain.name}' is a Markov chain: pass the object returned by "
                    "e_step (it carries the expected transition counts), not a plain dict."
                )
            if comp.globals and comp.groups or len(comp.latents) > 1:
                names = [lat.name for lat in comp.latents]
                raise ValueError(
                    f"Latents {names} are enumerated jointly: pass the object returned by "
                    "e_step (it carries their joint posterior), not a plain dict."
                )
            (lat,) = comp.latents
            resp = np.asarray(log_resp[lat.name], dtype=float)
            if comp.globals:
                tables.append(resp.reshape(-1))
            else:
                tables.append(np.zeros(1))
                tables.append(resp.reshape(lat.size, lat.n_support).T[None])
        return tables

    def _closed_form_values(self, values, joint_tables) -> list[np.ndarray]:
        if not self._closed_index:
            return []
        if self._closed_form_fn is None:
            graphs = self.graphs
            self._closed_form_fn = compile_function(
                [*graphs.values, *graphs.responsibilities.flat],
                [v for update in graphs.closed_form for v in update.new_values],
                self._compile_kwargs,
                self.backend,
            )
        return [np.asarray(v) for v in self._closed_form_fn(*values, *joint_tables)]

    def _stats_values(self, values, joint_tables) -> list[np.ndarray]:
        if not self.graphs.numeric.stats:
            return []
        if self._stats_fn is None:
            graphs = self.graphs
            self._stats_fn = compile_function(
                [*graphs.values, *graphs.responsibilities.flat],
                graphs.numeric.stats,
                self._compile_kwargs,
                self.backend,
            )
        return [np.asarray(v) for v in self._stats_fn(*values, *joint_tables)]

    def _objective(self, theta, closed, joint, stats):
        """Q of the numeric block and its gradient at ``theta`` (its flat values)."""
        fixed = [*closed, *joint, *stats]
        return self._objective_fn(theta, *(v for v, u in zip(fixed, self._objective_uses) if u))

    def _m_step_values(self, values, log_resp: LogResponsibilities):
        """ECM: the closed-form blocks (from the fused E-step call when it was made at
        ``values``), then the numeric block given them."""
        new = list(values)
        closed = log_resp.closed_form
        if closed is None:
            closed = self._closed_form_values(values, log_resp.joint)
        for index, value in zip(self._closed_index, closed):
            new[index] = value
        if not self._numeric_index:
            return new
        numeric = self.graphs.numeric_params
        start = join_flat(
            numeric, {p.value.name: new[i] for p, i in zip(numeric, self._numeric_index)}
        )
        scale = 1.0 / self.structure.n_observations
        stats = log_resp.stats
        if stats is None:
            stats = self._stats_values(values, log_resp.joint)
        closed = [new[i] for i in self._closed_index]

        def negative(theta):
            q, grad = self._objective(theta, closed, log_resp.joint, stats)
            return -scale * float(q), -scale * np.asarray(grad)

        # A trial point outside the support (a covariance no longer numerically
        # positive definite) is a point of zero density: +inf, stepped back from.
        negative = outside_support_as_inf(negative)
        q_start, _ = negative(start)
        theta, q_end = minimize_within_support(negative, start, _MSTEP_OPTIONS)
        # A generalized EM step only needs Q not to decrease; never accept worse.
        if not np.isfinite(q_end) or q_end > q_start:
            return new
        solved = split_flat(numeric, _polish(negative, theta))
        for p, i in zip(numeric, self._numeric_index):
            new[i] = solved[p.value.name]
        return new

    def run(
        self,
        point: Mapping[str, np.ndarray],
        *,
        tol: float = 1e-8,
        max_iter: int = 1000,
        accelerate: str | None = "auto",
        callback=None,
    ) -> tuple[dict[str, np.ndarray], EMHistory]:
        """Iterate from ``point`` to convergence (what :func:`pm_em.find_MAP` does for
        each start).

        Parameters
        ----------
        point : dict
            Start, constrained space.
        tol, max_iter
            As in :func:`pm_em.find_MAP`.
        accelerate : {"auto", "squarem", None}, default "auto"
            As in :func:`pm_em.find_MAP`: ``"squarem"``, SQUAREM cycles instead of
            single EM steps (monotone); ``"auto"``, plain EM steps and SQUAREM once
            a run has taken 30 without converging; None, plain EM steps only.
        callback : callable, optional
            Called as ``callback(iteration, point, logp)`` after every iteration; a
            true return value stops the run (``history.stopped == "callback"``).

        Returns
        -------
        point : dict
            The last point (constrained space).
        history : EMHistory
            ``logp`` per iteration, ``n_e_steps``, ``converged``, ``collapse``
            when the run stopped at a degenerate solution, ``stopped`` when the
            callback or Ctrl-C stopped it.

        Raises
        ------
        ValueError
            When the observed-data log-posterior is not finite at ``point``; the
            message names the variable and element responsible.
        """

        check_observed_data(self.model)

        def step(iteration, state):
            return callback(iteration, self.to_point(state.values), state.logp)

        state, history = run_em(
            self,
            self.to_values(point),
            tol=tol,
            max_iter=max_iter,
            accelerate=accelerate,
            callback=step if callback is not None else None,
        )
        if not np.isfinite(state.logp):
            raise ValueError(explain_nonfinite_logp(self, state.values, state.logp))
        return self.to_point(state.values), history

    def logp(self, point: Mapping[str, np.ndarray]) -> float:
        """Observed-data log-posterior at ``point``: latents summed out, priors
        included, no Jacobian. EM never decreases it."""
        return float(self._e_step_fn(*self.to_values(point))[0])

    # -- results ---------------------------------------------------------------------

    def _chain_outputs(self, values):
        """Each Markov chain's Viterbi path and one-step predictive state table, by
        chain name (compiled on first use)."""
        chained = [
            (comp.chain.name, path, predictive)
            for comp, path, predictive in zip(
                self.structure.components, self.graphs.chain_paths, self.graphs.chain_predictive
            )
            if comp.chain is not None
        ]
        if not chained:
            return {}, {}
        if self._chain_fn is None:
            self._chain_fn = compile_function(
                self.graphs.values,
                [g for _, path, predictive in chained for g in (path, predictive)],
                self._compile_kwargs,
                self.backend,
            )
        outputs = [np.asarray(v) for v in self._chain_fn(*values)]
        names = [name for name, _, _ in chained]
        return dict(zip(names, outputs[0::2])), dict(zip(names, outputs[1::2]))

    def _result_outputs(self, values, labels, predictive):
        """Deterministics and the pointwise log-likelihood, from one function compiled
        on first use (once per EM object, not per fit).

        A component where :func:`~pm_em.pointwise.direct_pointwise` holds gets its
        pointwise log-likelihood computed inside the function, from term tables that
        never leave it; the others return their per-configuration term tables, which
        :func:`~pm_em.pointwise.pointwise_loglik` combines in NumPy.
        """
        graphs = self.graphs
        components = self.structure.components
        free_observed = [t for t in self.structure.latent_free_terms if t.kind == "observed"]
        if self._result_fn is None:
            direct = [direct_pointwise(comp) for comp in components]
            direct_graphs = [
                pointwise_graphs(comp, tab) if is_direct else {}
                for comp, tab, is_direct in zip(components, graphs.tables, direct)
            ]
            tables = [
                []
                if is_direct
                else [*tab.global_term_tables, *(t for ts in tab.group_term_tables for t in ts)]
                for tab, is_direct in zip(graphs.tables, direct)
            ]
            self._result_layout = (
                direct,
                [list(d) for d in direct_graphs],
                [len(t) for t in tables],
            )
            self._result_fn = compile_function(
                graphs.values + [lat.value for lat in self.latents],
                graphs.deterministics
                + [t.logp for t in free_observed]
                + [g for d in direct_graphs for g in d.values()]
                + [t for ts in tables for t in ts],
                self._compile_kwargs,
                self.backend,
            )
        direct, direct_names, n_tables = self._result_layout
        outputs = iter(self._result_fn(*values, *(labels[lat.name] for lat in self.latents)))
        deterministics = {d.name: np.asarray(next(outputs)) for d in self.model.deterministics}
        pointwise = {t.name: np.asarray(next(outputs)) for t in free_observed}
        for names in direct_names:
            pointwise.update((name, np.asarray(next(outputs))) for name in names)
        for comp, is_direct, n_comp_tables in zip(components, direct, n_tables):
            if is_direct:
                continue
            comp_tables = [np.asarray(next(outputs)) for _ in range(n_comp_tables)]
            comp_global = comp_tables[: len(comp.global_terms)]
            rest = comp_tables[len(comp.global_terms) :]
            comp_groups = []
            for group in comp.groups:
                comp_groups.append(rest[: len(group.terms)])
                rest = rest[len(group.terms) :]
            element_prior = predictive.get(comp.chain.name) if comp.chain is not None else None
            pointwise.update(pointwise_loglik(comp, comp_global, comp_groups, element_prior))
        return deterministics, pointwise

    def finish(self, state: EMState, history: EMHistory) -> FitResult:
        """Package a final EM state: constrained point, most probable latent values,
        Deterministics there, and the pointwise log-likelihood.

        The most probable value is per element for an enumerated latent, and the most
        probable sequence (Viterbi path) for a Markov chain."""
        paths, predictive = self._chain_outputs(state.values)
        labels = {
            lat.name: np.asarray(paths[lat.name]).astype(lat.value.type.dtype, copy=False)
            if lat.name in paths
            else most_probable(state.log_resp[lat.name], lat.support, lat.value.type.dtype)
            for lat in self.latents
        }
        deterministics, pointwise = self._result_outputs(state.values, labels, predictive)
        return FitResult(
            point=self.to_point(state.values),
            deterministics=deterministics,
            labels=labels,
            log_resp=state.log_resp,
            pointwise=pointwise,
            logp=state.logp,
            history=history,
        )
