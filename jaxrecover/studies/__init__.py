"""Studies: every table in docs/ is one, run by one runner (``jaxrecover study NAME``).

A study is a config plus a pure run (:mod:`jaxrecover.studies.base`); :func:`run_study` does resume,
provenance and the docs block for all (:mod:`jaxrecover.studies.runner`). ``STUDIES`` lists them by name.
"""

from __future__ import annotations

from .boundary import BoundaryStudy
from .boundary_speed import BoundarySpeedStudy
from .clone import CloneStudy
from .defences import DefencesStudy
from .endpoints import EndpointsStudy
from .diagnostics import AccuracyStudy, ApproxPlansStudy, RayBreakpointsStudy
from .extraction import DeepExtractionStudy, ExtractionStudy
from .fixed_float32 import FixedFloat32Study
from .fixed_kinks import FixedKinksStudy
from .identification import IdentificationStudy
from .services import ServicesStudy
from .base import Context, Study, Unit, option
from .patterns import PatternLeakageStudy, PatternStudy
from .precision import KinksAuditStudy, OffRayChainsStudy, UlpSensitivityStudy
from .protocol import ProtocolSeedsStudy
from .runner import StudyResult, doc_checkpoints, run_study

__all__ = ["Study", "Unit", "Context", "option", "run_study", "StudyResult", "doc_checkpoints",
           "STUDIES", "get_study"]

STUDIES: dict[str, Study] = {s.name: s for s in (
    ServicesStudy(), FixedKinksStudy(), DefencesStudy(), PatternStudy(), PatternLeakageStudy(), BoundaryStudy(),
    BoundarySpeedStudy(),
    ExtractionStudy(), DeepExtractionStudy(), CloneStudy(), ProtocolSeedsStudy(), ApproxPlansStudy(), RayBreakpointsStudy(), AccuracyStudy(),
    UlpSensitivityStudy(), OffRayChainsStudy(), KinksAuditStudy(), IdentificationStudy(), FixedFloat32Study(),
    EndpointsStudy(),
)}


def get_study(name: str) -> Study:
    """The study called ``name`` (``jaxrecover study --list`` shows them)."""
    try:
        return STUDIES[name]
    except KeyError:
        raise ValueError(f"no study called {name!r}; jaxrecover study --list shows them: "
                         f"{', '.join(sorted(STUDIES))}") from None
