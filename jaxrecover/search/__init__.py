"""Decision-boundary search (L2 PGD, Carlini-Wagner, exact facet search) and Boundary Attribution run with it."""

from .attributions import boundary_attributions
from .boundary import (CW_EPS, PGD_EPS, SEARCH_METHODS, BoundaryResult, InputBox, boundary_search, cw_l2, facet_l2,
                       pgd_l2)

__all__ = ["PGD_EPS", "CW_EPS", "SEARCH_METHODS", "InputBox", "BoundaryResult", "pgd_l2", "cw_l2", "facet_l2",
           "boundary_search", "boundary_attributions"]
