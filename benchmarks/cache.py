"""Decoded-image cache: first pass (decode + write cache) vs cached pass (a new dataset object,
as in a new Flower ClientApp process) over one synthetic site. Prints seconds and the ratio.

    python benchmarks/cache.py [--patients 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clinfuse.config import load_config
from clinfuse.data.dataset import MultimodalDataset
from clinfuse.data.manifest import read_manifest
from clinfuse.data.synthetic import write_demo_cohort


def one_pass(records, cfg, cache_dir) -> tuple[float, MultimodalDataset]:
    started = time.perf_counter()
    dataset = MultimodalDataset(records, cfg, cache_dir=cache_dir)
    for i in range(len(dataset)):
        dataset[i]
    return time.perf_counter() - started, dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_demo_cohort(Path(tmp) / "cohort", sites=1, patients=args.patients, seed=0)[0]
        records = read_manifest(manifest, cfg).records
        # the images the patient items use (a patient's later films beyond max_count are not decoded)
        n_images = sum(len(s.inputs["image"]) for s in MultimodalDataset(records, cfg).samples)
        first, cached = [], []
        for repeat in range(args.repeats):
            cache_dir = Path(tmp) / f"cache-{repeat}"
            seconds, _ = one_pass(records, cfg, cache_dir)
            first.append(seconds)
            seconds, dataset = one_pass(records, cfg, cache_dir)
            assert dataset.cache.hits == n_images and dataset.cache.misses == 0
            cached.append(seconds)
    f, c = min(first), min(cached)
    print(f"records {len(records)}  images {n_images}  image size {tuple(cfg.modality('image').size)}")
    print(f"first pass (decode + cache write): {f:.3f} s  ({1000 * f / n_images:.2f} ms/image)")
    print(f"cached pass (new dataset, disk cache): {c:.3f} s  ({1000 * c / n_images:.2f} ms/image)")
    print(f"cached / first = {c / f:.3f}  (target <= 0.10)")


if __name__ == "__main__":
    main()
