"""pm_em: EM for the MAP of PyMC models with finite discrete latent variables."""

from pm_em.api import find_MAP
from pm_em.errors import (
    DegenerateSolutionWarning,
    EMConvergenceWarning,
    MultimodalWarning,
    UnsupportedModelError,
)
from pm_em.fit.state import EMIteration
from pm_em.results.compare import compare, compare_models, relabel
from pm_em.results.laplace import NonPositiveCurvatureError, fit_laplace
from pm_em.results.plots import plot_compare, plot_convergence
from pm_em.routine.em import EM

__all__ = [
    "EM",
    "DegenerateSolutionWarning",
    "EMConvergenceWarning",
    "EMIteration",
    "MultimodalWarning",
    "NonPositiveCurvatureError",
    "UnsupportedModelError",
    "compare",
    "compare_models",
    "find_MAP",
    "fit_laplace",
    "plot_compare",
    "plot_convergence",
    "relabel",
]
