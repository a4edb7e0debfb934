"""Result dataclasses: plain data, ``to_dict()`` for JSON."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Optional

import torch

__all__ = ["Result", "Spectrum", "Estimate", "Density"]


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
    """Mixin: ``to_dict()`` gives JSON-ready data, ``to_json()`` the string."""

    _skip_in_dict: tuple = ()

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in self._skip_in_dict}

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
