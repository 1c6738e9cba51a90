"""Run every gapclip benchmark in sequence (one subprocess each) and combine the results.

    python benchmarks/run_all.py [--quick|--smoke] [--device cpu|cuda] [--output DIR] [--only NAME,...]

Writes each benchmark's ``<name>.json`` / ``<name>.md`` plus the combined ``benchmarks.md`` and ``benchmarks.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHMARKS = [  # (script, result name)
    ("bench_term_overhead.py", "term_overhead"),
    ("bench_trainer_throughput.py", "trainer_throughput"),
    ("bench_eval_scale.py", "eval_scale"),
    ("bench_teacher_precompute.py", "teacher_precompute"),
    ("bench_scaling.py", "scaling"),
    ("bench_verify_images.py", "verify_images"),
    ("bench_data_pipeline.py", "data_pipeline"),
    ("bench_memory.py", "memory"),
]


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.splitlines()[0], argv, extra=lambda p: p.add_argument(
        "--only", default=None, help="comma-separated result names to (re)run; the others are combined from the "
        "existing DIR/<name>.json if present"))
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    passthrough = [f"--{args.mode}"] if args.mode != "full" else []
    passthrough += ["--device", args.device, "--output", str(out)]
    if args.repeats:
        passthrough += ["--repeats", str(args.repeats)]
    combined = {"mode": args.mode, "machine": C.machine_description(args.device), "benchmarks": {}}
    sections = [f"# gapclip benchmarks ({args.mode})", "", f"Machine: {combined['machine']}", ""]
    for script, name in BENCHMARKS:
        result_json, result_md = out / f"{name}.json", out / f"{name}.md"
        if only is not None and name not in only:
            if result_json.is_file() and result_md.is_file():
                previous = json.loads(result_json.read_text())
                combined["benchmarks"][name] = previous
                sections += [result_md.read_text(), f"_(from an earlier run: {previous.get('seconds', 0):.0f} s)_", ""]
            continue
        start = time.perf_counter()
        print(f"=== {script} {' '.join(passthrough)}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script), *passthrough])
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not result_json.is_file():
            combined["benchmarks"][name] = {"error": f"exit code {proc.returncode}", "seconds": seconds}
            sections += [f"## {name}", "", f"FAILED (exit code {proc.returncode})", ""]
            continue
        combined["benchmarks"][name] = {**json.loads(result_json.read_text()), "seconds": seconds}
        result_json.write_text(json.dumps(combined["benchmarks"][name], indent=1, default=float))
        sections += [result_md.read_text(), f"_({seconds:.0f} s)_", ""]
    (out / "benchmarks.md").write_text("\n".join(sections))
    (out / "benchmarks.json").write_text(json.dumps(combined, indent=1, default=float))
    print(f"Wrote {out / 'benchmarks.md'} and {out / 'benchmarks.json'}")
    failed = [n for n, r in combined["benchmarks"].items() if "error" in r]
    if failed:
        print(f"Failed: {failed}", file=sys.stderr)
        sys.exit(1)
    return combined


if __name__ == "__main__":
    main()
