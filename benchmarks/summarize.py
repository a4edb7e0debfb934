"""Compact table of a pytest-benchmark JSON file.

    python benchmarks/summarize.py bench.json

One row per benchmark: group, name, median time, and the speedup over its
group's reference (the benchmark whose ``extra_info['reference']`` is true,
i.e. ``reference median / median``; ``-`` when the group has none).
"""
import argparse
import json
import sys


def format_seconds(s):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def rows(data):
    benches = data["benchmarks"]
    reference = {
        b["group"]: b["stats"]["median"]
        for b in benches
        if b.get("extra_info", {}).get("reference")
    }
    for b in sorted(benches, key=lambda b: (b["group"] or "", b["stats"]["median"])):
        median = b["stats"]["median"]
        ref = reference.get(b["group"])
        speedup = f"{ref / median:.1f}x" if ref else "-"
        yield b["group"] or "-", b["name"], format_seconds(median), speedup


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="output of pytest --benchmark-json")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        table = [("group", "name", "median", "speedup vs ref")] + list(rows(json.load(f)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for k, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
