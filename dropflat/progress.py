"""Progress bars: tqdm, on by default only where a person is watching (a terminal)."""
from __future__ import annotations

import sys
from typing import Iterable, Optional

__all__ = ["progress_bar", "resolve_progress"]


def resolve_progress(progress: Optional[bool]) -> bool:
    """``None`` means: show progress when stderr is a terminal."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def progress_bar(iterable: Optional[Iterable] = None, *, enabled: bool, **kwargs):
    """A tqdm bar when ``enabled``; otherwise a silent stand-in with the same ``update``/``set_postfix_str``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)
