"""benchmarks/gpu_check.sh and its report, checked without a GPU (the full rehearsal is
``bash benchmarks/gpu_check.sh --dry-run``, minutes: it builds)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_report  # noqa: E402


def test_script_parses_and_rejects_unknown_arguments(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _write_outputs(out: Path):
    (out / "steps.tsv").write_text("build\tok\t70\ngpu_tests\tfailed (exit 1)\t95\nkernel_bench\ttimed out\t60\n")
    (out / "build_info.json").write_text(json.dumps({"cuda_compiled": True, "cuda_arch_list": ["90"],
                                                     "triton_version": "3.6.0", "triton_supported": True}))
    (out / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="no CUDA device"/></testcase>'
        '<testcase classname="tests.test_b" name="test_ok2"/>'
        '</testsuite></testsuites>')
    rows = [{"model": "gpt2-small", "gradient_s": 0.05, "rop_matmat_k8": 2.5, "top20_converged": 20,
             "steps": {"gradient": "ok 1.0 s", "func_vmap_compiled": "skipped: time budget"}}]
    (out / "gpu_models.json").write_text(json.dumps({"card": "NVIDIA H200", "torch": "2.11.0", "smoke": False,
                                                     "rows": rows}))


def test_report_reads_every_output_and_prints_one_table(tmp_path, capsys):
    _write_outputs(tmp_path)
    assert gpu_report.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["ok", "failed (exit 1)", "timed out"]
    tests = report["gpu_tests"]
    assert (tests["passed"], tests["failures"], tests["skipped"]) == (2, 1, 1)
    assert tests["failed"] == ["tests.test_a::test_bad"] and tests["skip_reasons"] == ["no CUDA device"]
    for expected in ("2 passed, 1 failed, 1 skipped", "FAILED", "tests.test_a::test_bad", "NVIDIA H200",
                     "gpt2-small: dropflat matmat k=8 (per vector)", "2.5 grad passes", "top-20 converged",
                     "skipped: time budget", "no bench.json", "timed out"):
        assert expected in printed, expected


def test_report_without_any_output(tmp_path, capsys):
    assert gpu_report.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "no report" in printed and "no gpu_models.json" in printed and "no bench.json" in printed


def test_model_script_arguments():
    pytest.importorskip("torch")
    import gpu_models

    with pytest.raises(SystemExit) as exc:
        gpu_models.main(["--help"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        gpu_models.main(["--budget-s", "soon"])
    assert exc.value.code == 2
