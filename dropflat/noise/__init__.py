"""Dropout noise: replayable masks, their takeover of a model's dropout, and the noise covariance."""
from .masks import keep_mask, mask_key
from .takeover import MaskSource, NoDropoutError, replay_dropout

__all__ = ["keep_mask", "mask_key", "MaskSource", "NoDropoutError", "replay_dropout"]
