"""How long the 260,000-GPU programme takes to publish at serial level, and what the API answers
for it afterwards (issue 11, item 3).

Starts Kafka and PostgreSQL (tests.infra.kafka_and_postgres) and every service as its own process
(tests.stack.start_stack, one database each), runs `gputrace demo --scale S --serials` against
them exactly as an operator would, then times the auditor API on the result.

    python -m tests.benchmarks.bench_demo --scale 0.1

Results: bench/results/demo-<scale>.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.infra import kafka_and_postgres
from tests.stack import auditor_headers, dump_logs, start_stack

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def timed_get(client: httpx.Client, path: str, **params: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    r = client.get(path, params=params)
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000, r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per demo phase")
    ap.add_argument("--out", type=Path, default=RESULTS)
    opts = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gputrace-bench-demo-"))
    work.chmod(0o755)  # as root, PostgreSQL runs as postgres and must enter it
    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m tests.benchmarks.bench_demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "scale": opts.scale,
    }
    with kafka_and_postgres(work) as (bootstrap, admin_url, _, _):
        stack, tokens = start_stack(bootstrap, admin_url, work / "stack")
        try:
            program_id = f"KR-AI-260K-{int(time.time())}"
            demo = [sys.executable, "-m", "tools.cli", "demo", "--bootstrap", bootstrap, "--keys"]
            demo += [str(work / "stack" / "keys"), "--api", stack.api_url, "--program-id", program_id]
            demo += ["--scale", str(opts.scale), "--serials", "--timeout", str(opts.timeout), "--seed", "1"]
            load_before = os.getloadavg()
            t0 = time.monotonic()
            done = subprocess.run(demo, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
            report["demo_seconds"] = round(time.monotonic() - t0, 1)
            report["load_average_before_after"] = [load_before, os.getloadavg()]
            report["demo_exit_code"] = done.returncode
            (work / "demo.out").write_text(done.stdout + done.stderr)
            print(done.stdout[-8000:], done.stderr[-3000:], sep="\n", flush=True)
            with httpx.Client(base_url=stack.api_url, headers=auditor_headers(tokens), timeout=120) as api:
                ms, r = timed_get(api, "/v1/program", program_id=program_id)
                program = r.json()
                report["program"] = {k: program[k] for k in ("gpus_total", "pipeline_gpus", "batches_by_stage")}
                timings = {"/v1/program": ms}
                ms, r = timed_get(api, "/v1/batches", program_id=program_id, limit=50)
                timings["/v1/batches"] = ms
                batch = r.json()["items"][0]["batch_id"]
                timings["/v1/batches/{id}"], _ = timed_get(api, f"/v1/batches/{batch}")
                timings["/v1/batches/{id}/epcis"], epcis = timed_get(api, f"/v1/batches/{batch}/epcis")
                report["epcis_bytes"] = len(epcis.content)
                ms, r = timed_get(api, "/v1/log/checkpoint", format="json")
                timings["/v1/log/checkpoint"] = ms
                report["log_size"] = r.json()["size"]
                timings["/ (dashboard)"], _ = timed_get(api, "/")
                report["api_ms"] = {k: round(v, 1) for k, v in timings.items()}
        except Exception:
            print(dump_logs(stack), file=sys.stderr)
            raise
        finally:
            stack.stop()
    opts.out.mkdir(parents=True, exist_ok=True)
    name = f"demo-{opts.scale:g}"
    (opts.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# gputrace demo --scale {opts.scale:g} --serials ({report['started']})",
        "",
        f"Command: `{report['command']}`; machine: {report['machine']}; load average before/after "
        f"{report.get('load_average_before_after')}.",
        "",
        f"- demo exit code {report.get('demo_exit_code')}, {report.get('demo_seconds')} s end to end",
        f"- ledger log size {report.get('log_size')}, programme {report.get('program')}",
        f"- API after the run (one request each, ms): {report.get('api_ms')}; EPCIS of one batch "
        f"{report.get('epcis_bytes', 0):,} bytes",
        "",
    ]
    (opts.out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
