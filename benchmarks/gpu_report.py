"""The one table that ends ``gpu_check.sh``, and ``gpu_check.json`` beside it.

    python benchmarks/gpu_report.py --out OUT

Reads what the steps left in ``OUT``: ``steps.tsv`` (step, status, seconds),
``build_info.json``, ``gpu_tests.xml`` (pytest's JUnit report of the
``gpu``-marked tests), ``gpu_models.json`` (:mod:`gpu_models`) and
``bench.json`` (the kernel benchmarks); any of them may be missing (a step
failed or was skipped), which the table says. Writes everything, merged, to
``OUT/gpu_check.json`` and prints one table: section, item, result.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Reads JSON only: no torch or dropflat import, so the report prints whatever the steps managed.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import summarize  # noqa: E402

TABLE = [("gradient_s", "gradient pass, s"), ("dropflat_gradient", "dropflat loss_and_gradient"),
         ("rop_matvec", "dropflat matvec"),
         ("rop_matmat_k8", "dropflat matmat k=8 (per vector)"), ("double_backward", "double backward"),
         ("func_jvp", "torch.func jvp(grad)"), ("func_vmap_k8", "torch.func vmap k=8 (per vector)"),
         ("gradient_compiled_s", "compiled gradient pass, s"),
         ("rop_matmat_k8_compiled", "dropflat matmat k=8, compiled model"),
         ("func_vmap_k8_compiled", "torch.func vmap k=8, compiled"),
         ("rop_k8_peak_mib", "peak MiB, matmat k=8"), ("top20_s", "top-20 Lanczos, s"),
         ("top20_converged", "top-20 converged"), ("noise_m64_s", "dropout noise M=64, s")]


def table_lines(result: dict):
    """The figures as ``(what, model, value)`` rows (product rows in gradient passes)."""
    for r in result["rows"]:
        for key, label in TABLE:
            if r.get(key) is not None:
                value = r[key]
                unit = "" if key.endswith(("_s", "_mib", "_converged")) else " grad passes"
                cell = f"{value:.3g}{unit}" if isinstance(value, float) else f"{value}{unit}"
                yield label, r["model"], cell
        for key, status in r["steps"].items():
            if not status.startswith("ok"):
                yield f"step {key}", r["model"], status


def read_steps(path: Path):
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, status, seconds = line.split("\t")
        steps.append({"step": name, "status": status, "seconds": int(seconds)})
    return steps


def read_junit(path: Path):
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    skipped = sorted({(case.find("skipped").get("message") or "")[:120] for case in root.iter("testcase")
                      if case.find("skipped") is not None})
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed, "skip_reasons": skipped}


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def table(report: dict):
    for s in report["steps"]:
        yield "step", s["step"], f"{s['status']} ({s['seconds']} s)"
    info = report["build_info"]
    if info is not None:
        yield "build", "CUDA compiled", f"{info.get('cuda_compiled')} archs={','.join(info.get('cuda_arch_list', []))}"
        yield "build", "triton", f"{info.get('triton_version')} supported={info.get('triton_supported')}"
    tests = report["gpu_tests"]
    if report["mode"] == "dry-run":
        yield "gpu tests", "-", "collected only (dry run): see the gpu_tests_collect step"
    elif tests is None:
        yield "gpu tests", "-", "no report (step skipped or failed before pytest wrote it)"
    else:
        yield "gpu tests", "counts", (f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                                      f"{tests['skipped']} skipped")
        for name in tests["failed"]:
            yield "gpu tests", "FAILED", name
        for reason in tests["skip_reasons"]:
            yield "gpu tests", "skip reason", reason
    models = report["models"]
    if models is None:
        yield "models", "-", "no gpu_models.json"
    else:
        yield "models", "card", f"{models['card']} (torch {models['torch']}, smoke={models['smoke']})"
        for what, model, value in table_lines(models):
            yield "models", f"{model}: {what}", value
    bench = report["kernels"]
    if bench is None:
        yield "kernels", "-", "no bench.json"
    else:
        for group, name, median, speedup in summarize.rows(bench):
            yield "kernels", f"{group}: {name}", f"{median} ({speedup} vs ref)" if speedup != "-" else median


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder gpu_check.sh wrote to")
    parser.add_argument("--mode", default="device", help="'device' or 'dry-run' (recorded)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    report = {"mode": args.mode, "steps": read_steps(out / "steps.tsv"),
              "build_info": read_json(out / "build_info.json"), "gpu_tests": read_junit(out / "gpu_tests.xml"),
              "models": read_json(out / "gpu_models.json"), "kernels": read_json(out / "bench.json")}
    if report["kernels"] is not None:  # keep the figures, not pytest-benchmark's machine details
        report["kernels"] = {"benchmarks": [{"group": b["group"], "name": b["name"], "stats": b["stats"],
                                             "extra_info": b.get("extra_info", {})}
                                            for b in report["kernels"]["benchmarks"]]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    rows = [("section", "item", "result")] + list(table(report))
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(2)]
    for k, (section, item, result) in enumerate(rows):
        print(f"{section.ljust(widths[0])}  {item.ljust(widths[1])}  {result}")
        if k == 0:
            print("-" * (widths[0] + widths[1] + 40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
