"""The victim side: IG services (what an attacker queries), defences that wrap them, BIG as a service, and the
real peers (Captum, PAIR saliency; extra ``services``) in :mod:`jaxrecover.services.external`.

Every service is an :class:`IGService`; wrappers (defences, the attacker's :class:`jaxrecover.attacks.Averaged`)
are :class:`ServiceWrapper` s and stay services. Every answer is checked where it leaves a service
(:func:`check_answers`).
"""

from .base import (AssumedBaseline, IGService, QueryBudgetExceeded, ServiceAnswerError, ServiceWrapper,
                   StepCountRefused, attack_inputs, check_answers)
from .big import BoundaryBaseline
from .defences import (ClientBudget, ExpectedGradients, FixSteps, GaussianNoise, LaplaceNoise, RandomSteps,
                       RoundAnswers, SmoothGradIG, TopK, round_significant)
from .simulated import SimulatedIGService

__all__ = [
    "IGService", "ServiceWrapper", "SimulatedIGService", "AssumedBaseline", "QueryBudgetExceeded",
    "StepCountRefused", "ServiceAnswerError", "check_answers", "attack_inputs", "BoundaryBaseline",
    "RoundAnswers", "GaussianNoise", "LaplaceNoise", "TopK", "FixSteps", "RandomSteps", "ClientBudget",
    "SmoothGradIG", "ExpectedGradients", "round_significant",
]
