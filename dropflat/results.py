"""Result dataclasses: plain data, ``to_dict()`` for JSON, with a run manifest.

Every result's ``to_dict()`` carries a ``"manifest"``: the dropflat, torch and
Python versions, and, where the producing function filled them in, the device,
dtype, seed(s), wall time of the call and number of operator products.

>>> m = run_manifest(seed=3, n_matvecs=12)
>>> sorted(m)[:4], m["seed"], m["n_matvecs"]
(['device', 'dropflat', 'dtype', 'n_matvecs'], 3, 12)
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
from typing import Any, Dict, Optional

import torch

__all__ = ["Result", "Spectrum", "Estimate", "Density", "run_manifest"]


def run_manifest(*, device=None, dtype=None, seed=None, wall_time: Optional[float] = None,
                 n_matvecs: Optional[int] = None, **extra) -> Dict[str, Any]:
    """How a result was produced: versions, and the call's device, dtype, seed, wall time (s), product count.

    Keys are always present (``None`` where not applicable); ``extra`` adds
    function-specific entries: ``resumed_from``, the operator products (masks for
    :func:`~dropflat.dropout_noise`) already done by earlier runs of a checkpointed call;
    ``gradient_passes`` for the dropout noise. ``wall_time_s`` is this call's only.
    """
    from . import __version__  # lazy: the package imports this module

    return {"dropflat": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": None if device is None else str(device), "dtype": None if dtype is None else str(dtype),
            "seed": seed, "wall_time_s": wall_time, "n_matvecs": n_matvecs, **extra}


def autocast_of(op) -> Optional[str]:
    """The autocast dtype an operator's products run under, for a manifest (``None``: full precision)."""
    dtype = getattr(op, "autocast", None)
    return None if dtype is None else str(dtype)


def _plain(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class Result:
    """Mixin: ``to_dict()`` gives JSON-ready data plus ``"manifest"``, ``to_json()`` the string.

    ``manifest`` is an instance attribute, not a dataclass field (so subclasses
    keep their field order and equality): functions set it with
    :func:`run_manifest`; results built elsewhere report the versions only.
    """

    _skip_in_dict: tuple = ()
    manifest = None  # class default; not annotated, so never a dataclass field

    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in self._skip_in_dict}
        out.setdefault("manifest", _plain(self.manifest if self.manifest is not None else run_manifest()))
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


@dataclasses.dataclass
class Spectrum(Result):
    """Eigenpairs from :func:`dropflat.lanczos`.

    ``eigenvalues``: float64 ``Tensor[k]``, descending. ``eigenvectors``: unit-norm
    ``Tensor[k, P]`` (row ``i`` belongs to ``eigenvalues[i]``) or ``None``.
    ``residuals``: ``||H v_i - λ_i v_i||``; ``converged[i]``: whether it met the tolerance.
    """

    eigenvalues: torch.Tensor
    eigenvectors: Optional[torch.Tensor]
    residuals: torch.Tensor
    converged: torch.Tensor
    n_matvecs: int
    which: str = "largest"
    tol: float = 1e-3
    _skip_in_dict = ("eigenvectors",)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@dataclasses.dataclass
class Estimate(Result):
    """A stochastic estimate with its standard error (trace, Frobenius norm)."""

    value: float
    stderr: float
    n_matvecs: int
    method: str = ""

    def __float__(self) -> float:
        return float(self.value)


@dataclasses.dataclass
class Density(Result):
    """Stochastic Lanczos quadrature: per run, Gauss nodes and weights; and a smoothed density.

    ``nodes``/``weights``: ``Tensor[num_runs, num_steps]`` (each run's weights sum to 1).
    ``grid``/``density``: the Gaussian-smoothed spectral density, integrating to 1.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    n_matvecs: int

    def moment(self, fn) -> float:
        """Estimate ``(1/P) tr f(H)`` from the quadrature: the mean over runs of ``Σ w f(node)``."""
        return float((self.weights * fn(self.nodes)).sum(dim=1).mean())

    def plot(self, ax=None, log: bool = True):
        """Plot the smoothed density (log scale by default, as spectra span decades)."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        y = self.density.clamp_min(1e-12) if log else self.density
        ax.plot(self.grid.numpy(), y.numpy())
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax
