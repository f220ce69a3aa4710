"""Lookahead for JAX: a drop-in optax combinator (Zhang et al., NeurIPS 2019)."""

from lookahead_optax import theory
from lookahead_optax._aliases import diloco, ranger, snoo
from lookahead_optax._alpha import AdaptiveAlpha, AdaptiveAlphaState, AlphaRangeWarning, adaptive_alpha
from lookahead_optax._exchange import ReplicaMeanState, replica_mean
from lookahead_optax._flax import slow_model, slow_train_state, sync_nnx, sync_train_state
from lookahead_optax._lookahead import LookaheadState, lookahead
from lookahead_optax._placement import LookaheadPlacementWarning
from lookahead_optax._policy import POLICIES as INNER_STATE_POLICIES
from lookahead_optax._state import find_lookahead_state, force_sync, resize_replicas, slow_params
from lookahead_optax._streaming import Streaming, streaming

__version__ = "0.2.0"

__all__ = [
  "AdaptiveAlpha",
  "AdaptiveAlphaState",
  "AlphaRangeWarning",
  "INNER_STATE_POLICIES",
  "LookaheadPlacementWarning",
  "LookaheadState",
  "ReplicaMeanState",
  "Streaming",
  "adaptive_alpha",
  "diloco",
  "find_lookahead_state",
  "force_sync",
  "lookahead",
  "ranger",
  "replica_mean",
  "resize_replicas",
  "slow_model",
  "slow_params",
  "slow_train_state",
  "snoo",
  "streaming",
  "sync_nnx",
  "sync_train_state",
  "theory",
]
