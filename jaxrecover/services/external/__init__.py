"""Real IG implementations as services (extra ``services``): Captum on a PyTorch twin of the model, PAIR saliency."""

from .peers import CAPTUM_RULES, CaptumIGService, SaliencyIGService, require_extra

__all__ = ["CaptumIGService", "SaliencyIGService", "CAPTUM_RULES", "require_extra"]
