"""Pipeline throughput: a burst of radiographs through the whole service against the model-only throughput of the
same ensemble on the same machine, side by side.

Starts PostgreSQL (its own cluster), Redis and Orthanc (the PACS the SRs and heatmaps go to) as the fault suite does
(bench/faults/run.py), the listener and `--workers` Celery workers on queues gpu,cpu with the promoted ensemble
(`--models`, default the repository's registry), sends `--count` chest radiographs (each its own study) on one
association, and times from the first C-STORE until every instance is triaged and every SR is in Orthanc. Then it
measures the model-only throughput of the same ensemble, backend and batch size in this process (decode + ensemble,
`bench/inference.py`), and prints both and their ratio. Run: `python -m bench.throughput [--count 300]
[--batch-size 8] [--backend openvino] [--workers 1] [--no-heatmap]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.faults.run import ROOT, Suite, counts, log, make_instances, storescu
from bench.inference import images, throughput
from cxr_triage.registry import Registry
from workers.ensemble import load_ensemble


def model_only(models: Path, backend: str, batch: int, count: int) -> float:
    """Images/s of decode-free ensemble inference (inputs decoded once) at this backend and batch size."""
    registry = Registry(models)
    name = registry.promoted_name()
    assert name is not None
    cache = Path(tempfile.mkdtemp(prefix="cxr-onnx-"))
    ensemble = load_ensemble(registry, name, torch.device("cpu"), backend=backend, cache_dir=cache)  # type: ignore[arg-type]
    return throughput(ensemble, images(ensemble.input_sizes, min(count, 64)), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-heatmap", action="store_true", help="Only the SR (no Grad-CAM heatmap) per instance.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-throughput-"))
    work.chmod(0o755)
    settings = {
        "CXR_TRIAGE_BATCH_SIZE": str(args.batch_size),
        "CXR_INFERENCE_BACKEND": args.backend,
        "CXR_RESULTS_HEATMAP": "false" if args.no_heatmap else "true",
    }
    suite = Suite(work, args.models, settings)
    try:
        files = make_instances(work / "burst-data", args.count)
        service, url = suite.service("burst")
        for _ in range(args.workers - 2):
            service.start_worker()
        while len(service.workers) > args.workers:  # Suite starts two
            extra = service.workers.pop()
            extra.terminate()
            extra.wait()
        time.sleep(5)  # workers up and the ensemble loaded (first task loads it: counted below)
        log(f"sending {args.count} instances")
        started = time.monotonic()
        acknowledged = storescu(int(service.env["CXR_PORT"]), list(files.values()), timeout=3600)
        sent_s = time.monotonic() - started
        settled = suite.settle(url, acknowledged, 7200)
        wall = time.monotonic() - started
        final = counts(url, suite.orthanc)
        service.stop()
    finally:
        suite.close()
        shutil.rmtree(work, ignore_errors=True)
    triaged = len(acknowledged & final.done)
    pipeline = triaged / wall
    log("model-only throughput of the same ensemble")
    alone = model_only(args.models, args.backend, args.batch_size, args.count)
    ratio = pipeline / alone
    print(f"\nburst of {args.count}: {len(acknowledged)} acknowledged in {sent_s:.1f} s, {triaged} triaged with SRs at "
          f"the PACS in {wall:.1f} s{'' if settled is not None else ' (timed out)'}")  # fmt: skip
    print(f"pipeline {pipeline:.2f} images/s; model-only {alone:.2f} images/s; ratio {ratio:.2f} "
          f"(backend {args.backend}, batch {args.batch_size}, {args.workers} worker(s), "
          f"heatmap {'off' if args.no_heatmap else 'on'})")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"throughput-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    report.write_text(json.dumps({
        "count": args.count, "acknowledged": len(acknowledged), "triaged": triaged, "wall_s": round(wall, 1),
        "pipeline_images_per_s": round(pipeline, 2), "model_only_images_per_s": round(alone, 2),
        "ratio": round(ratio, 2), "backend": args.backend, "batch_size": args.batch_size, "workers": args.workers,
        "heatmap": not args.no_heatmap, "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }, indent=2) + "\n")  # fmt: skip
    print(f"report: {report}")


if __name__ == "__main__":
    main()
