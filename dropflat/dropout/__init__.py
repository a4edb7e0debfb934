"""Replayable dropout: counter-based masks and their takeover of an unmodified model's dropout."""
from .masks import REGIMES, keep_mask, keep_masks, mask_key
from .takeover import MaskSource, NoDropoutError, replay_dropout

__all__ = ["REGIMES", "keep_mask", "keep_masks", "mask_key", "MaskSource", "NoDropoutError", "replay_dropout"]
