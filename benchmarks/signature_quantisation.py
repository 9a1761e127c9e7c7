"""What storing the training images' signatures as int8 changes in finding copies of training images.

    .venv/bin/python benchmarks/signature_quantisation.py ../shared/datasets/brain-tumor-mri --bundle B

Bundles carry the near-duplicate signature of every training image (``train_signatures.safetensors``, int8,
see :mod:`medclf.data.references`) so that ``evaluate`` can remove near copies of training images from
data the training set is not part of. This script decodes DATA once (or reuses the evaluation cache when
``--bundle`` names a bundle whose preprocessing was used on DATA before), takes the training split's float
signatures as the reference, and compares, for every other sample, its best correlation with any training
image against the float and the int8 references: how many samples each flags as copies at the audit's
threshold, how many flags differ, the largest change of the best correlation, and how many samples lie so
close to the threshold that the rounding could move them. It also reports the bytes per training image and,
with ``--bundle``, the size of the bundle's weights for scale.

Writes ``benchmarks/results/signature-quantisation-<name>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medclf.data.references import dequantise_signatures, pack_signatures, quantise_signatures
from medclf.data.scan import scan
from medclf.data.signatures import NEAR_THRESHOLD, nearest
from medclf.data.sources import load_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--bundle", help="a bundle trained on DATA: its preprocessing finds DATA's cached decode")
    ap.add_argument("--name", default=None)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    samples = load_source(args.data)
    weights_bytes = None
    if args.bundle:
        from medclf.bundle import load_bundle
        from medclf.data.cache import prepare

        b = load_bundle(args.bundle)
        weights_bytes = (b.path / "model.safetensors").stat().st_size
        result = prepare(samples, b.spec, workers=args.workers).scan
    else:
        result = scan(samples, workers=args.workers)
    is_train = np.array([s == "train" for s in samples.splits])
    usable = result.decoded & ~result.constant
    ref_rows = np.flatnonzero(is_train & usable)
    query_rows = np.flatnonzero(~is_train & usable)
    ref = result.signatures[ref_rows]
    query = result.signatures[query_rows]

    best_float, _ = nearest(query, ref)
    best_int8, _ = nearest(query, dequantise_signatures(quantise_signatures(ref)))
    flags_float = best_float >= NEAR_THRESHOLD
    flags_int8 = best_int8 >= NEAR_THRESHOLD
    change = np.abs(best_float.astype(np.float64) - best_int8)
    packed = pack_signatures(ref)
    out = {
        "data": str(args.data),
        "n_training_images": len(ref_rows),
        "n_queries": len(query_rows),
        "threshold": NEAR_THRESHOLD,
        "flagged_float": int(flags_float.sum()),
        "flagged_int8": int(flags_int8.sum()),
        "flags_differ": int((flags_float != flags_int8).sum()),
        "best_correlation_change_max": float(change.max()) if len(change) else None,
        "best_correlation_change_p99": float(np.percentile(change, 99)) if len(change) else None,
        "queries_within_0.001_of_threshold": int((np.abs(best_float - NEAR_THRESHOLD) < 1e-3).sum()),
        "bytes_per_training_image": len(packed) / max(len(ref_rows), 1),
        "train_signatures_file_bytes": len(packed),
        "float32_would_be_bytes": int(ref.astype(np.float32).nbytes),
        "bundle_weights_bytes": weights_bytes,
    }
    name = args.name or Path(args.data).stem
    dest = Path(__file__).parent / "results" / f"signature-quantisation-{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
