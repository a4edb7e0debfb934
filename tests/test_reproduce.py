"""``dropflat reproduce``: all four experiments end to end on real data (CIFAR, Multi30k from ../shared/data).

MNIST is not in ../shared/data; its loader is fed IDX files written here from
scikit-learn's real 8x8 digits, upscaled to 28x28 (the IDX reader itself is
tested byte-exact in test_datasets.py). The default run trains 3 steps per
model (the pipeline, every measurement, the report and resuming); ``--runslow``
runs the real ``--quick`` presets.
"""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from dropflat.cli import main
from dropflat.experiments.measure import MeasureConfig
from dropflat.experiments.reproduce import EXPERIMENTS, reproduce

from conftest import SHARED_DATA

pytest.importorskip("matplotlib")
SHARED = SHARED_DATA


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if not (SHARED / "cifar10").is_dir():
        pytest.skip("../shared/data is not present")
    sklearn = pytest.importorskip("sklearn.datasets")
    root = tmp_path_factory.mktemp("data")
    for name in ("cifar10", "cifar100", "multi30k"):
        (root / name).symlink_to(SHARED / name)
    digits = sklearn.load_digits()
    images = np.kron(digits.images / 16.0 * 255.0, np.ones((3, 3)))      # 8x8 -> 24x24
    images = np.pad(images, ((0, 0), (2, 2), (2, 2))).round()            # -> 28x28, MNIST-like border
    labels = digits.target
    (root / "mnist").mkdir()
    for prefix, sl in (("train", slice(0, 1500)), ("t10k", slice(1500, None))):
        _write_idx(root / "mnist" / f"{prefix}-images-idx3-ubyte.gz", images[sl], 2051)
        _write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", labels[sl], 2049)
    return root


def _check_report(report: dict, name: str) -> None:
    assert report["experiment"] == name and {"seed", "device", "elapsed_s"} <= set(report)
    assert set(report["runs"]) == {"dropout", "no_dropout"}
    for run in report["runs"].values():
        eig = run["hessian_top_eigenvalues"]
        assert eig == sorted(eig, reverse=True) and len(eig) >= 1
        assert run["train_loss"] > 0 and 0.0 <= run["test_accuracy"] <= 1.0
        assert isinstance(run["hessian_trace"], float)
        assert len(run["interval_flatness"]) >= 1
        assert all(w is None or w > 0 for w in run["interval_flatness"])
    a = report["runs"]["dropout"]["alignment"]
    assert {"cosine", "null_mean", "null_std", "slope", "slope_ci"} <= set(a)
    assert -1.0 <= a["cosine"] <= 1.0 and a["null_std"] > 0
    assert "alignment" not in report["runs"]["no_dropout"]


# Every measurement of the report, on a small budget: this test is about the pipeline, not the figures.
TINY = MeasureConfig(top_k=2, tol=1e-2, trace_matvecs=6, density_runs=1, density_steps=6, directions=2,
                     curve_points=5, num_masks=4, align_k=2, flatness_tol=0.1)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_reproduce_pipeline_and_resume(name, data_dir, tmp_path):
    out = tmp_path / name
    run = lambda: reproduce(name, data_dir, out, quick=True, steps=3, measure=TINY, progress=False)  # noqa: E731
    report = run()
    _check_report(report, name)
    written = json.loads((out / "report.json").read_text(),  # strict JSON: no NaN/Infinity constants
                         parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    assert written["runs"]["dropout"]["hessian_top_eigenvalues"] == report["runs"]["dropout"]["hessian_top_eigenvalues"]
    assert all(r["train_steps"] == 3 and r["resumed_from_step"] == 0 for r in report["runs"].values())
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "dropout.pt").exists() and (out / "checkpoints" / "no_dropout.pt").exists()
    # A rerun finds both trained models and their measurements: nothing is recomputed, the figures are the same.
    again = run()
    for label, r in again["runs"].items():
        assert r["resumed_from_step"] == 3
        assert r["hessian_top_eigenvalues"] == report["runs"][label]["hessian_top_eigenvalues"]


def test_reproduce_command_line(data_dir, tmp_path, capsys):
    args = ["reproduce", "fnn-mnist", "--quick", "--steps", "2", "--data", str(data_dir), "--out", str(tmp_path),
            "--quiet"]
    assert main(args) == 0
    _check_report(json.loads((tmp_path / "report.json").read_text()), "fnn-mnist")
    assert "λ_max" in capsys.readouterr().out


def test_reproduce_names_missing_data(tmp_path, capsys):
    assert main(["reproduce", "vgg-cifar10", "--quick", "--data", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cifar10" in err and str(tmp_path) in err


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_reproduce_quick_presets(name, data_dir, tmp_path):
    assert main(["reproduce", name, "--quick", "--data", str(data_dir), "--out", str(tmp_path), "--quiet"]) == 0
    _check_report(json.loads((tmp_path / "report.json").read_text()), name)
