"""The command line: ``dropflat demo`` end to end on a small configuration, and ``dropflat info``."""
import json

import pytest

from dropflat.cli import main

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "60", "--hidden", "16", "--quiet", "--seed", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["experiment"] == "demo-digits-mlp" and report["seed"] == 3
    assert set(report["runs"]) == {"dropout", "no_dropout"}
    for run in report["runs"].values():
        eig = run["hessian_top_eigenvalues"]
        assert len(eig) == 5 and eig == sorted(eig, reverse=True)
        assert 0.0 < run["train_loss"] < 3.0 and 0.0 <= run["test_accuracy"] <= 1.0
        assert run["hessian_trace_stderr"] >= 0
    a = report["runs"]["dropout"]["alignment"]
    assert {"cosine", "null_mean", "null_std", "slope", "slope_ci"} <= set(a)
    assert -1.0 <= a["cosine"] <= 1.0 and a["null_std"] >= 0 and len(a["slope_ci"]) == 2
    assert "alignment" not in report["runs"]["no_dropout"]
    assert all(len(run["interval_flatness"]) == 5 for run in report["runs"].values())
    assert (out / "report.md").read_text().startswith("# dropflat: demo-digits-mlp")
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "λ_max" in printed and "report.json" in printed


def test_info_prints_build_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "cuda_compiled" in info and "cpu_kernels" in info
