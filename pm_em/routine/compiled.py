"""The compiled EM routine of a model: its functions on value-variable arrays.

Built once per model (and options) from the graphs of :mod:`pm_em.routine.graphs`; every
method works on the parameters' values on the unconstrained space, in
``routine.params`` order. :class:`pm_em.EM` is the step-by-step API on points
over it, and the fit loop (:mod:`pm_em.fit.loop`, :mod:`pm_em.fit.squarem`) drives it
through the protocol of :class:`pm_em.fit.protocol.EMRoutine`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from pytensor.graph.traversal import ancestors

from pm_em.compile import compile_function, compile_small, resolve_backend
from pm_em.diagnostics import model_or_context
from pm_em.estep.pointwise import direct_pointwise, pointwise_graphs, pointwise_loglik
from pm_em.fit.protocol import ExpectedCounts
from pm_em.model.analysis import analyze_model
from pm_em.model.data import DataBinding, recording_reads
from pm_em.model.implicit import explicit_model
from pm_em.model.initial_point import model_initial_point
from pm_em.mstep.inputs import join_flat, split_flat
from pm_em.routine.graphs import build_em_graphs
from pm_em.routine.optimize import minimize_negative_q

__all__ = ["LogResponsibilities", "Routine"]

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


class Routine:
    """The EM routine of a model, compiled once: E-step, M-step and observed-data
    log-posterior on value-variable arrays (the loop's
    :class:`~pm_em.fit.protocol.EMRoutine`).

    Parameters
    ----------
    model, latent_vars, compile_kwargs, backend, closed_form
        As in :class:`pm_em.EM`, which builds the routine and keeps it in the cache
        of compiled routines.

    Raises
    ------
    UnsupportedModelError
        When a latent cannot be enumerated exactly; the message says why and what to do.
    """

    #: Its compiled functions keep their own storage: one start at a time.
    concurrent_starts = False

    def __init__(self, model, latent_vars, compile_kwargs, backend, closed_form):
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
        self._constrained_fn = compile_small(
            graphs.values, graphs.constrained, compile_kwargs, self.backend
        )
        self._unconstrained_fn = compile_small(
            graphs.constrained_inputs, graphs.unconstrained, compile_kwargs, self.backend
        )
        #: Passed to every :func:`pytensor.function` of the routine.
        self.compile_kwargs = compile_kwargs
        self._result_fn = None
        self._result_layout = None
        self._chain_fn = None
        #: The data this routine was built for (:mod:`pm_em.model.data`).
        self.data = DataBinding(self.user_model, self.model, build_reads)

    @property
    def n_observations(self) -> int:
        """Observed entries of the data (:class:`pm_em.model.analysis.ModelStructure`)."""
        return self.structure.n_observations

    @property
    def float_eps(self) -> float:
        """Machine epsilon of the model's precision
        (:attr:`pm_em.model.analysis.ModelStructure.float_eps`)."""
        return self.structure.float_eps

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

    def constrained(self, values: list[np.ndarray]) -> list[np.ndarray]:
        """Value-variable arrays -> the parameters' constrained values, in order."""
        return [np.asarray(v) for v in self._constrained_fn(*values)]

    def to_point(self, values: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Value-variable arrays -> constrained point (by variable name)."""
        return {p.name: v for p, v in zip(self.params, self.constrained(values))}

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

    @property
    def closed_form_params(self) -> list[str]:
        """Names of the parameters the M-step updates in closed form (the others are
        maximized numerically, given those)."""
        return [p.name for p in self.graphs.closed_params]

    def e_step(self, values: list[np.ndarray]) -> tuple[float, LogResponsibilities]:
        """The E-step at ``values``: the observed-data log-posterior there and the log
        responsibilities of every latent (with the closed-form blocks and the numeric
        block's statistics of the same call, for :meth:`m_step` at ``values``)."""
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

    def joint_tables(self, log_resp) -> list[np.ndarray]:
        """The joint tables :meth:`m_step` reads, from a plain dict of marginals
        (possible only when every latent is enumerated on its own)."""
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
                self.compile_kwargs,
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
                self.compile_kwargs,
                self.backend,
            )
        return [np.asarray(v) for v in self._stats_fn(*values, *joint_tables)]

    def _objective(self, theta, closed, joint, stats):
        """Q of the numeric block and its gradient at ``theta`` (its flat values)."""
        fixed = [*closed, *joint, *stats]
        return self._objective_fn(theta, *(v for v, u in zip(fixed, self._objective_uses) if u))

    def m_step(self, values: list[np.ndarray], log_resp: LogResponsibilities) -> list[np.ndarray]:
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

        theta = minimize_negative_q(negative, start)
        if theta is None:
            return new
        solved = split_flat(numeric, theta)
        for p, i in zip(numeric, self._numeric_index):
            new[i] = solved[p.value.name]
        return new

    def expected_counts(self, log_resp) -> list[ExpectedCounts]:
        """Per latent with more than one element, the sum of its responsibilities
        over its elements (:meth:`pm_em.fit.protocol.EMRoutine.expected_counts`)."""
        counts = []
        for latent in self.latents:
            if latent.size == 1:
                continue
            resp = np.exp(np.asarray(log_resp[latent.name], dtype=float))
            total = resp.reshape(-1, latent.n_support).sum(axis=0)
            counts.append(ExpectedCounts(latent.name, np.asarray(latent.support), total))
        return counts

    def logp(self, values: list[np.ndarray]) -> float:
        """Observed-data log-posterior at ``values``: latents summed out, priors
        included, no Jacobian. EM never decreases it."""
        return float(self._e_step_fn(*values)[0])

    # -- results ---------------------------------------------------------------------

    def chain_outputs(self, values):
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
                self.compile_kwargs,
                self.backend,
            )
        outputs = [np.asarray(v) for v in self._chain_fn(*values)]
        names = [name for name, _, _ in chained]
        return dict(zip(names, outputs[0::2])), dict(zip(names, outputs[1::2]))

    def result_outputs(self, values, labels, predictive):
        """Deterministics and the pointwise log-likelihood, from one function compiled
        on first use (once per EM object, not per fit).

        A component where :func:`~pm_em.estep.pointwise.direct_pointwise` holds gets its
        pointwise log-likelihood computed inside the function, from term tables that
        never leave it; the others return their per-configuration term tables, which
        :func:`~pm_em.estep.pointwise.pointwise_loglik` combines in NumPy.
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
                self.compile_kwargs,
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
