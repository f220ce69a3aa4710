"""Lookahead for JAX: a drop-in optax combinator (Zhang et al., NeurIPS 2019)."""

from lookahead_optax import theory
from lookahead_optax._aliases import diloco, ranger, snoo
from lookahead_optax._alpha import AdaptiveAlpha, AdaptiveAlphaState, adaptive_alpha
from lookahead_optax._flax import slow_model, slow_train_state, sync_nnx, sync_train_state
from lookahead_optax._lookahead import LookaheadState, lookahead
from lookahead_optax._placement import LookaheadPlacementError, LookaheadPlacementWarning
from lookahead_optax._policy import POLICIES as INNER_STATE_POLICIES
from lookahead_optax._state import find_lookahead_state, force_sync, slow_params

__version__ = "0.1.0"

__all__ = [
  "AdaptiveAlpha",
  "AdaptiveAlphaState",
  "INNER_STATE_POLICIES",
  "LookaheadPlacementError",
  "LookaheadPlacementWarning",
  "LookaheadState",
  "adaptive_alpha",
  "diloco",
  "find_lookahead_state",
  "force_sync",
  "lookahead",
  "ranger",
  "slow_model",
  "slow_params",
  "slow_train_state",
  "snoo",
  "sync_nnx",
  "sync_train_state",
  "theory",
]
