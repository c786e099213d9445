"""Inference throughput of the promoted ensemble: eager PyTorch one image per call (the worker today) against each
backend at several batch sizes, side by side, on the same images and machine.

Each configuration runs the whole ensemble as the worker does (`Ensemble.predict_batch`: every member, the
horizontal-flip test-time augmentation, the OOD detector, the combination), on real radiographs from
`tests/data/` decoded once. Prints images/s per configuration and its ratio to eager batch 1; writes
`bench/results/inference-*.json`. Run: `python -m bench.inference [--device cpu|cuda] [--images 48]
[--batch-sizes 1,8,16] [--backends eager,channels-last,onnx]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from cxr_triage.pixels import load_image, normalise
from cxr_triage.registry import Registry
from workers.ensemble import Ensemble, load_ensemble

ROOT = Path(__file__).resolve().parents[1]


def images(sizes: set[int], count: int) -> dict[int, torch.Tensor]:
    """`count` inputs per size, cycling through the repository's radiographs (DICOM and PNG)."""
    sources = sorted((ROOT / "tests" / "data" / "cxr").glob("*.png"))
    sources += sorted((ROOT / "tests" / "data" / "dicom").glob("*chest*.dcm"))
    out: dict[int, torch.Tensor] = {}
    for size in sizes:
        decoded = [normalise(load_image(p, size).pixels) for p in sources]
        out[size] = torch.stack([decoded[i % len(decoded)] for i in range(count)])
    return out


def throughput(ensemble: Ensemble, inputs: dict[int, torch.Tensor], batch: int, *, rounds: int = 2) -> float:
    """Images per second of predict_batch over all inputs in batches of `batch` (best of `rounds`, after a warm-up)."""
    n = next(iter(inputs.values())).shape[0]
    ensemble.predict_batch({s: t[:batch] for s, t in inputs.items()})  # warm-up (and ONNX session start)
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, n, batch):
            ensemble.predict_batch({s: t[i : i + batch] for s, t in inputs.items()})
        if ensemble.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="Model registry (its promoted set).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--backends", default="eager,channels-last,onnx,openvino")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = Registry(args.models)
    name = registry.promoted_name()
    if name is None:
        raise SystemExit(f"no promoted set in {args.models}")
    device = torch.device(args.device)
    cache = Path(tempfile.mkdtemp(prefix="cxr-onnx-"))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows: list[dict[str, Any]] = []
    inputs: dict[int, torch.Tensor] | None = None
    for backend in args.backends.split(","):
        if backend in ("onnx", "openvino") and device.type != "cpu":
            continue
        ensemble = load_ensemble(registry, name, device, backend=backend, cache_dir=cache)  # type: ignore[arg-type]
        inputs = inputs or images(ensemble.input_sizes, args.images)
        for batch in batch_sizes if backend != "eager" or device.type == "cuda" else [1, *batch_sizes]:
            if any(r["backend"] == backend and r["batch"] == batch for r in rows):
                continue
            ips = throughput(ensemble, inputs, batch)
            rows.append({"backend": backend, "batch": batch, "images_per_s": round(ips, 2)})
            print(f"{backend:>14} batch {batch:>3}: {ips:8.2f} images/s", flush=True)
    baseline = next(r["images_per_s"] for r in rows if r["backend"] == "eager" and r["batch"] == 1)
    for r in rows:
        r["ratio_to_eager_batch1"] = round(r["images_per_s"] / baseline, 2)
    print(f"\nensemble {name} ({len(registry.ensemble(name).members)} members, TTA {registry.ensemble(name).tta}), "
          f"{args.images} images, device {device}, {args.threads} threads")  # fmt: skip
    print(f"{'backend':>14} {'batch':>5} {'images/s':>9} {'x eager b1':>10}")
    for r in rows:
        print(f"{r['backend']:>14} {r['batch']:>5} {r['images_per_s']:>9.2f} {r['ratio_to_eager_batch1']:>10.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "ensemble": name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "images": args.images,
        "torch": torch.__version__,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    path = args.out / f"inference-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path}")


if __name__ == "__main__":
    main()
