"""pm_em: EM for the MAP of PyMC models with finite discrete latent variables."""

from pm_em.api import find_MAP
from pm_em.em import EM
from pm_em.errors import DegenerateSolutionWarning, EMConvergenceWarning, UnsupportedModelError
from pm_em.laplace import NonPositiveCurvatureError, fit_laplace

__all__ = [
    "EM",
    "DegenerateSolutionWarning",
    "EMConvergenceWarning",
    "NonPositiveCurvatureError",
    "UnsupportedModelError",
    "find_MAP",
    "fit_laplace",
]
