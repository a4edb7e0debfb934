"""``dropflat reproduce``: every experiment end to end on the real data in ../shared/data (MNIST, CIFAR, Multi30k).

The default run trains 3 steps per model (the pipeline, every measurement, the
per-seed and across-seed reports, resuming); ``--runslow`` runs the real
``--quick`` presets and ``reproduce all --quick``.
"""
import json

import pytest
import torch

from dropflat.cli import main
from dropflat.experiments.aggregate import SUMMARY_KEYS
from dropflat.experiments.measure import MeasureConfig
from dropflat.experiments.reproduce import EXPERIMENTS, reproduce, reproduce_all, seed_dir

from conftest import SHARED_DATA

pytest.importorskip("matplotlib")
SHARED = SHARED_DATA


@pytest.fixture(scope="module")
def data_dir():
    if not all((SHARED / name).is_dir() for name in ("mnist", "cifar10", "cifar100", "multi30k")):
        pytest.skip("../shared/data is not present")
    return SHARED


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


def _check_summary(summary: dict, name: str, seeds) -> None:
    assert set(SUMMARY_KEYS) <= set(summary) and summary["experiment"] == name and summary["seeds"] == list(seeds)
    assert [st["seed"] for st in summary["stops"]] == list(seeds)
    for st in summary["stops"]:
        for run in ("dropout", "no_dropout"):
            assert st[run]["reason"] in ("target", "cap") and st[run]["text"]
    claims = {c["claim"][:3] for c in summary["claims"]}
    assert {"(a)", "(b)", "(c)"} <= claims
    for c in summary["claims"]:
        assert c["verdict"] in ("holds", "fails", "inconclusive", "not called")


# One image and one sequence experiment here; test_reproduce_all_writes_one_report runs the other two.
@pytest.mark.parametrize("name", ["fnn-mnist", "transformer-multi30k"])
def test_reproduce_pipeline_and_resume(name, data_dir, tmp_path):
    out = tmp_path / name
    run = lambda: reproduce(name, data_dir, out, quick=True, steps=3, measure=TINY, progress=False)  # noqa: E731
    summary = run()
    _check_summary(summary, name, [0])
    report = json.loads((seed_dir(out, 0) / "report.json").read_text(),  # strict JSON: no NaN/Infinity constants
                        parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    _check_report(report, name)
    assert all(r["train_steps"] == 3 and r["resumed_from_step"] == 0 for r in report["runs"].values())
    # 3 steps cannot reach the common loss: the runs say so and claim (a) is not called.
    assert all(r["stop_reason"] == "cap" for r in report["runs"].values())
    assert all(c["verdict"] == "not called" for c in summary["claims"] if c["claim"].startswith("(a)"))
    assert (seed_dir(out, 0) / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "figures.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["experiment"] == name
    assert "| claim |" in (out / "report.md").read_text()
    ckpts = seed_dir(out, 0) / "checkpoints"
    assert (ckpts / "dropout.pt").exists() and (ckpts / "no_dropout.pt").exists()
    # A rerun finds both trained models and their measurements: nothing is recomputed, the figures are the same.
    again = run()
    rerun = json.loads((seed_dir(out, 0) / "report.json").read_text())
    for label, r in rerun["runs"].items():
        assert r["resumed_from_step"] == 3
        assert r["hessian_top_eigenvalues"] == report["runs"][label]["hessian_top_eigenvalues"]
    assert json.dumps(again["claims"]) == json.dumps(summary["claims"])  # NaN-safe comparison


def test_reproduce_two_seeds_gives_intervals(data_dir, tmp_path):
    summary = reproduce("fnn-mnist", data_dir, tmp_path, quick=True, steps=3, measure=TINY, seeds=[0, 1],
                        progress=False)
    _check_summary(summary, "fnn-mnist", [0, 1])
    one, two = (json.loads((seed_dir(tmp_path, s) / "report.json").read_text()) for s in (0, 1))
    assert one["runs"]["dropout"]["hessian_top_eigenvalues"] != two["runs"]["dropout"]["hessian_top_eigenvalues"]
    slope = next(c for c in summary["claims"] if c["claim"].startswith("(b)"))
    iv = slope["interval"]
    assert iv["n"] == 2 and iv["method"] == "t" and iv["lo"] < iv["mean"] < iv["hi"]
    assert slope["per_seed"] == [one["runs"]["dropout"]["alignment"]["slope"],
                                 two["runs"]["dropout"]["alignment"]["slope"]]
    acc = summary["accuracy"]["dropout"]
    assert acc["mean"] == pytest.approx(50 * (one["runs"]["dropout"]["test_accuracy"]
                                              + two["runs"]["dropout"]["test_accuracy"]))


def test_reproduce_all_writes_one_report(data_dir, tmp_path):
    report = reproduce_all(data_dir, tmp_path, quick=True, seeds={"fnn-mnist": 2, "vgg-cifar10": 1, "resnet": 1,
                                                                  "transformer-multi30k": 1, "theory": 2},
                           steps=2, measure=TINY, progress=False, theory_masks=200)
    # CIFAR-100 here has 100 images: the ResNet runs on the CIFAR-10 stand-in, and the report says so.
    assert list(report["experiments"]) == ["fnn-mnist", "vgg-cifar10", "resnet-cifar10", "transformer-multi30k"]
    assert "stand-in" in report["experiments"]["resnet-cifar10"]["data"]
    for name, summary in report["experiments"].items():
        _check_summary(summary, name, [0, 1] if name == "fnn-mnist" else [0])
        assert (tmp_path / name / "figures.png").exists()
    assert report["theory"]["claim"]["claim"].startswith("(d)") and len(report["theory"]["rows"]) == 2 * 3
    text = (tmp_path / "report.md").read_text()
    assert "98.7" in text and "49.3" in text and "(d)" in text
    assert json.loads((tmp_path / "report.json").read_text())["theory"]["num_masks"] == 200
    # Resumable: a second call reuses every run and the theory check written with the same plan ...
    from dropflat.experiments import theory_check as tc

    saved = tc.saved_theory(tmp_path / "theory", {"widths": [4, 16, 64], "seeds": [0, 1], "num_masks": 200})
    assert saved is not None and saved["rows"] == report["theory"]["rows"]
    # ... and not one written with another plan.
    assert tc.saved_theory(tmp_path / "theory", {"widths": [4, 16, 64], "seeds": [0, 1], "num_masks": 400}) is None
    assert tc.saved_theory(tmp_path / "theory", {"widths": [4, 16], "seeds": [0, 1], "num_masks": 200}) is None


def test_results_folder_with_pickled_objects_is_refused(data_dir, tmp_path):
    """A checkpoint or measurement cache someone else wrote is read with weights_only=True: no code runs on load."""
    out = tmp_path / "fnn"
    reproduce("fnn-mnist", data_dir, out, quick=True, steps=1, measure=TINY, progress=False)
    for name in ("dropout.pt", "no_dropout.measure.pt"):
        path = seed_dir(out, 0) / "checkpoints" / name
        blob = torch.load(path, weights_only=True)
        blob["fingerprint"] = _Payload()   # any pickled object that is not a tensor or a plain container
        torch.save(blob, path)
        with pytest.raises(ValueError, match="refuses to unpickle"):
            reproduce("fnn-mnist", data_dir, out, quick=True, steps=1, measure=TINY, progress=False)
        assert not _Payload.ran
        path.unlink()


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True
        return "pwned"


def test_reproduce_command_line(data_dir, tmp_path, capsys):
    args = ["reproduce", "fnn-mnist", "--quick", "--steps", "2", "--seeds", "1", "--data", str(data_dir),
            "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    _check_report(json.loads((seed_dir(tmp_path, 0) / "report.json").read_text()), "fnn-mnist")
    printed = capsys.readouterr().out
    assert "(a) dropout minimum flatter: λ_max" in printed and "report.md" in printed


def test_reproduce_names_missing_data(tmp_path, capsys):
    assert main(["reproduce", "vgg-cifar10", "--quick", "--data", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cifar10" in err and str(tmp_path) in err


def test_reproduce_rejects_bad_arguments(data_dir, tmp_path):
    with pytest.raises(ValueError, match="preset must be one of"):
        reproduce("fnn-mnist", data_dir, tmp_path, preset="huge")
    with pytest.raises(ValueError, match="seeds must be distinct"):
        reproduce("fnn-mnist", data_dir, tmp_path, quick=True, seeds=[1, 1])
    with pytest.raises(ValueError, match="target_loss must be > 0"):
        reproduce("fnn-mnist", data_dir, tmp_path, quick=True, target_loss=0.0)
    with pytest.raises(ValueError, match="unknown experiment 'mnist'"):
        reproduce_all(data_dir, tmp_path, quick=True, seeds={"mnist": 2})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_reproduce_quick_presets(name, data_dir, tmp_path):
    assert main(["reproduce", name, "--quick", "--data", str(data_dir), "--out", str(tmp_path), "--quiet"]) == 0
    _check_report(json.loads((seed_dir(tmp_path, 0) / "report.json").read_text()), name)
