"""Lookahead for JAX: a drop-in optax combinator (Zhang et al., NeurIPS 2019)."""

from lookahead_optax._aliases import diloco, ranger, snoo
from lookahead_optax._alpha import AdaptiveAlpha, AdaptiveAlphaState, adaptive_alpha, adaptive_alpha_value
from lookahead_optax._lookahead import INNER_STATE_POLICIES, LookaheadState, lookahead
from lookahead_optax._state import find_lookahead_state, force_sync, slow_params

__version__ = "0.1.0"

__all__ = [
    "AdaptiveAlpha",
    "AdaptiveAlphaState",
    "INNER_STATE_POLICIES",
    "LookaheadState",
    "adaptive_alpha",
    "adaptive_alpha_value",
    "diloco",
    "find_lookahead_state",
    "force_sync",
    "lookahead",
    "ranger",
    "snoo",
    "slow_params",
]
