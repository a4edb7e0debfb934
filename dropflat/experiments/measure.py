"""What the experiments measure at a trained minimum: one function for ``demo`` and ``reproduce``.

Curvature is of the training loss with dropout off and BatchNorm on running
statistics (``PAPER.md``, "Conventions"); the dropout run adds the
dropout-noise covariance and its alignment with the Hessian.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..flatness import dropout_trajectory, filter_normalized_direction, interval_flatness, loss_along, variance_flatness
from ..linalg import lanczos, spectral_density
from ..linalg.stochastic import trace_and_frobenius
from ..noise import alignment, dropout_noise
from ..operators import HessianOperator
from .training import take_samples

__all__ = ["MeasureConfig", "measure", "alignment_probe"]


@dataclass
class MeasureConfig:
    top_k: int = 5               # Hessian eigenpairs (Lanczos)
    tol: float = 1e-3            # their relative residual tolerance
    trace_matvecs: int = 60      # Hutch++ products for trace and Frobenius norm
    density_runs: int = 4        # SLQ start vectors (0: no density)
    density_steps: int = 40
    directions: int = 5          # filter-normalised random directions for interval flatness and 1-D curves
    kappa: float = 2.0           # interval flatness level: L = kappa * L*
    flatness_tol: float = 1e-2   # relative precision of the crossings (each halving costs one data pass)
    curve_radius: float = 1.0    # 1-D loss curves over alpha in [-radius, radius] ...
    curve_points: int = 21       # ... at this many points
    num_masks: int = 64          # dropout masks for the noise covariance
    masks: str = "per_sample"    # mask regime of the noise ("per_sample": PyTorch's, "shared": the theory's)
    align_k: int = 10            # Hessian eigenpairs the noise is projected on
    trajectory_steps: int = 0    # > 0: keep training with dropout this many GD steps from the minimum ...
    trajectory_lr: float = 0.05  # ... at this learning rate, and fit the inverse variance–flatness relation
    pca_k: int = 10              # over this many principal directions of the trajectory
    track_every: int = 0         # > 0: cosine(H, C) of the dropout run every this many training steps ...
    track_masks: int = 16        # ... from this many masks ...
    track_samples: int = 512     # ... on the first this many curvature samples (a cheap probe, not the measurement)


def measure(model: nn.Module, loader: Sequence, loss_fn: Callable, accuracy: Callable[[nn.Module], float],
            cfg: MeasureConfig, *, with_noise: bool, seed: int = 0, progress: Optional[bool] = None) -> Dict:
    """Flatness and noise figures of ``model`` at its current parameters (the model is not modified).

    Returns the report's run record: plain numbers and lists only (JSON- and
    ``weights_only``-safe), including the 1-D loss curves and the SLQ density for the plots.
    """
    H = HessianOperator(model, loader, loss_fn)
    train_loss = H.loss.mean_loss()
    spec = lanczos(H, k=max(cfg.top_k, cfg.align_k if with_noise else 0), tol=cfg.tol, eigenvectors=True,
                   seed=seed, progress=progress)
    trace, frobenius = trace_and_frobenius(H, num_matvecs=cfg.trace_matvecs, seed=seed, progress=progress)
    # Filter-normalised directions keep their scale (distances in units of the direction, as in Li et al.):
    # that scale is what makes minima of differently scaled ReLU networks comparable.
    random_dirs = filter_normalized_direction(model, seed=seed, k=cfg.directions)
    flat_random = interval_flatness(model, loader, random_dirs, kappa=cfg.kappa, loss_fn=loss_fn, normalize=False,
                                    tol=cfg.flatness_tol)
    flat_top = interval_flatness(model, loader, spec.eigenvectors[: cfg.top_k], kappa=cfg.kappa, loss_fn=loss_fn,
                                 tol=cfg.flatness_tol)
    alphas = torch.linspace(-cfg.curve_radius, cfg.curve_radius, cfg.curve_points, dtype=torch.float64)
    curves = loss_along(model, loader, random_dirs, alphas, loss_fn=loss_fn)
    record = {
        "train_loss": train_loss,
        "test_accuracy": accuracy(model),
        "hessian_top_eigenvalues": spec.eigenvalues[: cfg.top_k].tolist(),
        "eigenvalue_residuals": spec.residuals[: cfg.top_k].tolist(),
        "hessian_trace": trace.value,
        "hessian_trace_stderr": trace.stderr,
        "hessian_frobenius": frobenius.value,
        "interval_flatness": _finite_list(flat_random.flatness),
        "interval_flatness_top_eigenvectors": _finite_list(flat_top.flatness),
        "num_parameters": H.shape[0],
        "loss_curves": {"alphas": curves.alphas.tolist(), "losses": curves.losses.tolist(),
                        "base_loss": float(curves.base_loss)},
    }
    n_matvecs = spec.n_matvecs + trace.n_matvecs
    if cfg.density_runs > 0:
        density = spectral_density(H, num_runs=cfg.density_runs, num_steps=cfg.density_steps, seed=seed,
                                   progress=progress)
        record["spectral_density"] = {"grid": density.grid.tolist(), "density": density.density.tolist(),
                                      "sigma": float(density.sigma)}
        n_matvecs += density.n_matvecs
    if with_noise:
        noise = dropout_noise(model, loader, loss_fn, num_masks=cfg.num_masks, masks=cfg.masks, seed=seed,
                              progress=bool(progress))
        al = alignment(H, noise, k=cfg.align_k, seed=seed, spectrum=spec, norms=(trace, frobenius),
                       progress=progress)
        record["alignment"] = {"cosine": al.cosine, "null_mean": al.null_mean, "null_std": al.null_std,
                               "slope": al.slope, "slope_ci": list(al.slope_ci),
                               "subspace_overlap": al.subspace_overlap, "masks": cfg.masks,
                               "num_masks": cfg.num_masks,
                               "hessian_eigenvalues": al.hessian_eigenvalues.tolist(),
                               "projected_variance": al.projected_variance.tolist(),
                               "projected_variance_null": _projection_null(al.noise_trace, al.noise_frobenius,
                                                                           H.shape[0])}
        record["noise_top_eigenvalues"] = noise.eigenvalues[: cfg.top_k].tolist()
        n_matvecs += al.n_matvecs
    if with_noise and cfg.trajectory_steps > 0:
        trajectory = dropout_trajectory(model, loader, steps=cfg.trajectory_steps, lr=cfg.trajectory_lr,
                                        loss_fn=loss_fn, seed=seed, masks=cfg.masks)
        vf = variance_flatness(model, loader, trajectory, k=min(cfg.pca_k, cfg.trajectory_steps - 1),
                               kappa=cfg.kappa, seed=seed, loss_fn=loss_fn, tol=cfg.flatness_tol)
        record["variance_flatness"] = {"exponent": vf.psi, "exponent_ci": list(vf.psi_ci),
                                       "variances": vf.variances.tolist(), "flatness": _finite_list(vf.flatness),
                                       "steps": cfg.trajectory_steps, "lr": cfg.trajectory_lr}
    record["hessian_matvecs"] = n_matvecs
    return record


def _projection_null(trace: float, frobenius: float, P: int) -> Dict[str, float]:
    """Mean and standard deviation of ``vᵀCv`` for a uniformly random unit vector ``v`` (the null of ``v_iᵀ C v_i``).

    ``E = tr C / P``, ``Var = 2 (P ‖C‖_F² − (tr C)²) / (P² (P + 2))``.
    """
    var = 2.0 * max(P * frobenius ** 2 - trace ** 2, 0.0) / (P ** 2 * (P + 2))
    return {"mean": trace / P, "std": var ** 0.5}


def _finite_list(values) -> list:
    """JSON has no infinity: a width whose level was never reached is reported as ``None``."""
    return [float(v) if torch.isfinite(torch.as_tensor(v)) else None for v in values]


def alignment_probe(loader: Sequence, loss_fn: Callable, cfg: MeasureConfig, seed: int = 0) -> Callable:
    """``probe(model) -> {"cosine", "null_mean", "null_std", "train_loss"}``.

    A cheap alignment check during training: few masks, two eigenpairs, loose tolerances.
    """
    loader = _first_samples(loader, cfg.track_samples)

    def probe(model: nn.Module) -> Dict:
        H = HessianOperator(model, loader, loss_fn)
        noise = dropout_noise(model, loader, loss_fn, num_masks=cfg.track_masks, masks=cfg.masks, seed=seed)
        al = alignment(H, noise, k=2, seed=seed, num_matvecs=min(cfg.trace_matvecs, 30), tol=1e-2)
        return {"cosine": al.cosine, "null_mean": al.null_mean, "null_std": al.null_std,
                "train_loss": H.loss.mean_loss()}
    return probe


def _first_samples(batches: Sequence, n: int) -> list:
    """The leading ``n`` samples of a list of ``(inputs, targets)`` batches (inputs a tensor or a tuple)."""
    out, left = [], n
    for x, y in batches:
        if left <= 0:
            break
        take = slice(0, min(left, len(y)))
        out.append((take_samples(x, take), y[take]))
        left -= take.stop
    return out
