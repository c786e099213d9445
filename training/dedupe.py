"""Deduplication across sources: exact (sha256 of the bytes) and perceptual (16x16 difference hash, 256 bits).

COVIDx already contains Cohen's images, and Cohen re-uses images under several patient ids, so a naive merge puts
the same film on both sides of a split. Images at Hamming distance <= `drop_distance` are copies: one is kept.
Images at distance <= `group_distance`, and all images of one patient, share a `split_group`, which the split
never separates (the thresholds are those used to build the shared data set: 12 and 18).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from cxr_triage.pixels import load_image
from training.dataset import sha256_file

HASH_SIZE = 16


def dhash(path: str) -> np.ndarray:
    """256-bit difference hash of the image as the model sees it (same decoder), as 4 uint64 words."""
    unit = load_image(path, 64).pixels  # type: ignore[arg-type]
    small = Image.fromarray((unit * 255).astype(np.uint8)).resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS)
    arr = np.asarray(small, dtype=np.int16)
    bits = (arr[:, 1:] > arr[:, :-1]).flatten()
    words: np.ndarray = np.packbits(bits).view(">u8").astype(np.uint64)
    return words


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between (n, 4) and (m, 4) uint64 hashes: an (n, m) matrix."""
    counts: np.ndarray = np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=-1).astype(np.int32)
    return counts


def near_pairs(hashes: np.ndarray, max_distance: int, *, block: int = 512) -> list[tuple[int, int, int]]:
    """All pairs i < j at distance <= max_distance, in blocks so memory stays O(block x n)."""
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, len(hashes), block):
        dist = hamming_matrix(hashes[start : start + block], hashes)
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows, cols, strict=True):
            i = start + int(r)
            if i < int(c):
                pairs.append((i, int(c), int(dist[r, c])))
    return sorted(pairs)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(frozen=True)
class DedupeResult:
    manifest: pd.DataFrame  # kept rows, with sha256, dhash and split_group columns
    dropped: pd.DataFrame  # removed copies, with `duplicate_of`
    counts: Counter[str]


def dedupe(df: pd.DataFrame, *, drop_distance: int = 12, group_distance: int = 18) -> DedupeResult:
    """Drop exact and near-exact copies (keeping the first row: put preferred sources first), group the rest."""
    if drop_distance > group_distance:
        raise ValueError("drop_distance must not exceed group_distance")
    df = df.reset_index(drop=True).copy()
    df["sha256"] = [sha256_file(p) for p in df["path"]]
    hashes = np.stack([dhash(p) for p in df["path"]]) if len(df) else np.zeros((0, 4), np.uint64)
    df["dhash"] = ["".join(f"{int(w):016x}" for w in h) for h in hashes]
    pairs = near_pairs(hashes, group_distance)

    keep = np.ones(len(df), dtype=bool)
    duplicate_of: dict[int, int] = {}
    counts: Counter[str] = Counter()
    first_by_sha: dict[str, int] = {}
    for i, sha in enumerate(df["sha256"]):
        if sha in first_by_sha:
            keep[i] = False
            duplicate_of[i] = first_by_sha[sha]
            counts["exact duplicate"] += 1
        else:
            first_by_sha[sha] = i
    for i, j, d in pairs:
        if d <= drop_distance and keep[i] and keep[j]:
            keep[j] = False
            duplicate_of[j] = i
            counts["near-exact copy"] += 1

    groups = _UnionFind(len(df))
    by_patient: dict[str, int] = {}
    for i, patient in enumerate(df["patient_id"]):
        if patient in by_patient:
            groups.union(i, by_patient[patient])
        else:
            by_patient[patient] = i
    if "split_group" in df.columns:  # a source's own grouping (e.g. the shared manifest's provenance)
        by_group: dict[str, int] = {}
        for i, group in enumerate(df["split_group"]):
            if group:
                if group in by_group:
                    groups.union(i, by_group[group])
                else:
                    by_group[group] = i
    for i, j, _ in pairs:
        groups.union(i, j)
    for j, i in duplicate_of.items():  # a dropped copy's patient joins the kept image's group
        groups.union(i, j)
    df["split_group"] = [f"g{groups.find(i):06d}:{df['patient_id'][groups.find(i)]}" for i in range(len(df))]

    dropped = df[~keep].copy()
    dropped["duplicate_of"] = [df["path"][duplicate_of[int(i)]] for i in np.nonzero(~keep)[0]]
    return DedupeResult(df[keep].reset_index(drop=True), dropped.reset_index(drop=True), counts)
