"""Inference throughput of the promoted ensemble: eager PyTorch at fp32 one image per call (the baseline) against
each backend at several batch sizes, side by side, on the same images and machine; on CUDA, the worker's GPU path
(bf16 autocast, channels-last, pinned inputs) by batch size.

Each configuration runs the whole ensemble as the worker does (`Ensemble.predict_batch`: every member, the
horizontal-flip test-time augmentation, the OOD detector, the combination; inputs start in host memory), on real
radiographs from `tests/data/` decoded once. Prints images/s per configuration and its ratio to eager fp32 batch 1;
writes `bench/results/inference-*.json`. Run: `python -m bench.inference [--device cpu|cuda] [--autocast
auto|off|bf16] [--images 48] [--batch-sizes 1,8,16] [--backends eager,channels-last,onnx]` (bench/README.md).
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
from workers.backends import Autocast, autocast_dtype
from workers.ensemble import Ensemble, device_batch_size, free_device_bytes, load_ensemble, pick_device

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


def throughput(
    ensemble: Ensemble, inputs: dict[int, torch.Tensor], batch: int, *, rounds: int = 2, max_seconds: float = 0.0
) -> float:
    """Images per second of predict_batch over the inputs in batches of `batch`: best of `rounds`, after a warm-up of
    two batches. A round stops early once it has run `max_seconds` (0: no limit), counting the images it did. On
    CUDA the device is synchronised before the clock starts and before it stops."""
    n = next(iter(inputs.values())).shape[0]
    for _ in range(2):  # warm-up: ONNX session start, cuDNN's algorithm choice and autocast caches for this shape
        ensemble.predict_batch({s: t[:batch] for s, t in inputs.items()})
    best = 0.0
    for _ in range(rounds):
        _synchronise(ensemble.device)
        started = time.perf_counter()
        done = 0
        for i in range(0, n, batch):
            ensemble.predict_batch({s: t[i : i + batch] for s, t in inputs.items()})
            done += min(batch, n - i)
            if max_seconds and time.perf_counter() - started >= max_seconds:
                break
        _synchronise(ensemble.device)
        best = max(best, done / (time.perf_counter() - started))
    return best


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the defaults of --images, --batch-sizes and --backends depend on the device."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="Model registry (its promoted set).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (as CXR_DEVICE).")
    parser.add_argument(
        "--autocast",
        choices=["auto", "off", "bf16"],
        default="auto",
        help="PyTorch backends: auto = bf16 on CUDA (the worker's path), off on the CPU; bf16 runs the autocast path "
        "on the CPU too. Eager fp32 batch 1 is always measured as the baseline.",
    )
    parser.add_argument("--images", type=int, help="Images per round (default 48 on the CPU, 1024 on CUDA).")
    parser.add_argument(
        "--batch-sizes", help="Comma-separated (default 1,8,16 on the CPU, 1,8,32,128,256,512 on CUDA)."
    )
    parser.add_argument(
        "--backends",
        help="Comma-separated (default eager,channels-last,onnx,openvino on the CPU, eager on CUDA, where both PyTorch "
        "backends are channels-last).",
    )
    parser.add_argument("--rounds", type=int, default=2, help="Timed rounds per configuration; the best counts.")
    parser.add_argument(
        "--max-seconds", type=float, help="A round stops after this long (default: never on the CPU, 10 s on CUDA)."
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    cuda = args.device != "cpu" and (args.device != "auto" or torch.cuda.is_available())
    args.images = args.images or (1024 if cuda else 48)
    args.max_seconds = args.max_seconds if args.max_seconds is not None else (10.0 if cuda else 0.0)
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,8,32,128,256,512" if cuda else "1,8,16")).split(",")]
    args.backends = (args.backends or ("eager" if cuda else "eager,channels-last,onnx,openvino")).split(",")
    if args.images < 1 or min(args.batch_sizes) < 1:
        parser.error("--images and every batch size must be at least 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures every configuration, prints the table and writes the JSON report; returns the report."""
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)  # cuda without a GPU: DeviceUnavailable, as in the worker
    registry = Registry(args.models)
    name = registry.promoted_name()
    if name is None:
        raise SystemExit(f"no promoted set in {args.models}")
    cache = Path(tempfile.mkdtemp(prefix="cxr-onnx-"))
    # The baseline first: eager PyTorch at fp32, one image per call (the worker before batching and autocast).
    plan: list[tuple[str, Autocast, list[int]]] = [("eager", "off", [1])]
    plan += [(backend, args.autocast, args.batch_sizes) for backend in args.backends]
    rows: list[dict[str, Any]] = []
    inputs: dict[int, torch.Tensor] | None = None
    image_bytes: int | None = None
    for backend, autocast, batch_sizes in plan:
        if backend in ("onnx", "openvino") and (device.type != "cpu" or autocast_dtype(autocast, device)):
            print(f"{backend:>14}: skipped (runs at fp32 on the CPU only)", flush=True)
            continue
        ensemble = load_ensemble(registry, name, device, backend=backend, cache_dir=cache, autocast=autocast)  # type: ignore[arg-type]
        image_bytes = ensemble.image_bytes  # of the last set loaded: the worker's path, not the baseline
        inputs = inputs or images(ensemble.input_sizes, args.images)
        for batch in batch_sizes:
            if any(
                r["backend"] == backend and r["precision"] == ensemble.precision and r["batch"] == batch for r in rows
            ):
                continue
            ips = throughput(ensemble, inputs, batch, rounds=args.rounds, max_seconds=args.max_seconds)
            row = {"backend": backend, "precision": ensemble.precision, "batch": batch, "images_per_s": round(ips, 2)}
            rows.append(row)
            print(f"{backend:>14} {ensemble.precision:>5} batch {batch:>4}: {ips:9.2f} images/s", flush=True)
        del ensemble
        if device.type == "cuda":
            torch.cuda.empty_cache()
    baseline = rows[0]["images_per_s"]
    for r in rows:
        r["ratio_to_eager_batch1"] = round(r["images_per_s"] / baseline, 2)
    spec = registry.ensemble(name)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\nensemble {name} ({len(spec.members)} members, TTA {spec.tta}), {args.images} images per round, "
          f"device {device} ({device_name}), {args.threads} threads")  # fmt: skip
    print(f"{'backend':>14} {'prec':>5} {'batch':>5} {'images/s':>9} {'x eager fp32 b1':>15}")
    for r in rows:
        print(f"{r['backend']:>14} {r['precision']:>5} {r['batch']:>5} {r['images_per_s']:>9.2f} "
              f"{r['ratio_to_eager_batch1']:>15.2f}")  # fmt: skip
    memory_batch_limit = None
    if device.type == "cuda" and image_bytes is not None:
        memory_batch_limit = device_batch_size(free_bytes=free_device_bytes(device), image_bytes=image_bytes, cap=1024)
        print(f"peak device memory per image {image_bytes / 2**20:.1f} MiB: a worker's pass fits up to "
              f"{memory_batch_limit} images (CXR_CUDA_BATCH_SIZE caps it)")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "ensemble": name,
        "device": str(device),
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "images": args.images,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "image_bytes": image_bytes,
        "memory_batch_limit": memory_batch_limit,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    path = args.out / f"inference-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path}")
    return report


def main() -> None:
    run(parse_args())


if __name__ == "__main__":
    main()
