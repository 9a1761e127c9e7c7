"""From a dataset fingerprint and a time budget to a training plan, in the spirit of nnU-Net's planner.

The fingerprint is measured on a random subset of decoded samples (sizes, dimensionality, colour, formats,
modality, intensity) plus the label counts. Rules turn it into a preprocessing spec, an architecture, a
batch size, an augmentation preset and, after a short timed benchmark of the chosen network on this
machine, the number of epochs that fits the budget. Explicit user settings always win over the rules.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medclf.augment import check_mix, preset_for_modality
from medclf.data.samples import SampleSet
from medclf.errors import ConfigError, DataError, InputRejected
from medclf.models import create_model
from medclf.preprocess import PreprocessSpec

SIZES_2D = (28, 32, 48, 64, 96, 128, 160, 192, 224, 256)
SIZES_3D = (28, 32, 48, 64, 96, 128)
# The planner's fallback when even its smallest input size is too slow for the budget (2D).
NARROWER = {"compact-l": "compact", "compact": "compact-s"}
# Axial slabs of the automatic 2.5D fallback: ~1 cm each over a head, thin enough for a lesion to show.
DEFAULT_SLABS = 16


@dataclass
class Fingerprint:
    n_samples: int
    class_counts: dict[str, dict[str, int]]
    spatial_dims: int
    median_shape: list[int]
    min_side: int
    max_side: int
    channels: int
    colour_fraction: float
    formats: dict[str, int]
    modalities: dict[str, int]
    n_probed: int
    n_unreadable_probed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """Everything :func:`medclf.train.train` needs to run; printed before training and stored in the bundle."""

    arch: str
    arch_kwargs: dict[str, Any]
    spec: PreprocessSpec
    batch_size: int
    epochs: int
    lr: float
    weight_decay: float
    augment: str
    amp: str
    channels_last: bool
    ema: bool
    patience: int
    label_smoothing: float
    reasons: list[str] = field(default_factory=list)
    throughput: float | None = None  # training images/s measured on this machine
    epoch_seconds: float | None = None
    # Transfer learning: the bundle the weights start from ({"path", "sha256", "classes"}) and the layer
    # groups (see the model registry) kept frozen.
    init_from: dict[str, Any] | None = None
    freeze: list[str] = field(default_factory=list)
    # Batch mixing (see medclf.augment.MIX_METHODS) and its Beta(alpha, alpha); bundles made before it: none.
    mix: str = "none"
    mix_alpha: float = 0.0
    # Shortcut mitigation (medclf.mitigation): "on"/"off", and the acquisition group keys training batches
    # are balanced over within each class. Bundles made before it: off, none.
    shortcut_mitigation: str = "off"
    balance_by: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        kw = dict(d)
        kw["spec"] = PreprocessSpec.from_dict(kw["spec"])
        return cls(**kw)


def fingerprint(samples: SampleSet, *, n_probe: int = 48, seed: int = 0) -> Fingerprint:
    """Decode a seeded random subset of training samples and summarise what the data looks like."""
    train = samples.indices("train")
    if len(train) == 0:
        raise DataError(f"{samples.source}: no training samples")
    rng = np.random.default_rng(seed)
    probe = rng.choice(train, size=min(n_probe, len(train)), replace=False)
    shapes, channels, colour, formats, modalities = [], [], [], Counter(), Counter()
    bad = 0
    for i in probe:
        try:
            img = samples.load(int(i))
        except InputRejected:
            bad += 1
            continue
        shapes.append(img.spatial_shape)
        channels.append(img.channels)
        colour.append(img.channels >= 3 and _is_colourful(img.pixels))
        formats[img.format] += 1
        modalities[str(img.meta.get("modality") or "unknown")] += 1
    if not shapes:
        raise DataError(f"{samples.source}: none of {len(probe)} probed training files could be read")
    dims = Counter(len(s) for s in shapes).most_common(1)[0][0]
    shapes = [s for s in shapes if len(s) == dims]
    med = [int(v) for v in np.median(np.array(shapes), axis=0)]
    colour_fraction = float(np.mean(colour))
    return Fingerprint(
        n_samples=len(samples),
        class_counts=samples.summary(),
        spatial_dims=dims,
        median_shape=med,
        min_side=int(min(min(s) for s in shapes)),
        max_side=int(max(max(s) for s in shapes)),
        channels=3 if colour_fraction > 0.5 else 1,
        colour_fraction=colour_fraction,
        formats=dict(formats),
        modalities=dict(modalities),
        n_probed=len(probe),
        n_unreadable_probed=bad,
    )


def _is_colourful(px: np.ndarray) -> bool:
    # JPEG chroma noise makes "grey" RGB files differ by a few levels: call it colour only when it shows.
    rng = float(px.max() - px.min()) or 1.0
    return float(np.abs(px[0] - px[1]).mean() + np.abs(px[1] - px[2]).mean()) / rng > 0.02


def target_epochs(n_train: int) -> int:
    """Epochs a from-scratch CNN needs to converge here: more passes for small datasets (~150k steps of
    images in total), between 30 and 120."""
    return int(np.clip(150_000 / max(n_train, 1), 30, 120))


def initial_plan(
    fp: Fingerprint, n_train: int, overrides: dict[str, Any], *, world_size: int = 1, device: str = "cpu"
) -> Plan:
    """Rule-based plan before any timing: everything but the final size and epoch count.

    ``world_size`` processes train together (torchrun): ``batch_size`` is the global batch, split evenly
    across them. When the planner picks the batch it gives every process the batch one process would get,
    and raises the peak learning rate by sqrt(world_size), the square-root scaling rule for adaptive
    optimisers (Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", 2022).
    """
    reasons: list[str] = []
    dims = fp.spatial_dims
    native = min(fp.median_shape)
    slabs = int(overrides.get("slices_as_channels") or 0)
    if slabs and dims != 3:
        raise ConfigError(
            "--slices-as-channels needs volumes (NIfTI, DICOM series, 3D .npz); this data is 2D"
        )
    is_ct = fp.modalities.get("CT", 0) > fp.n_probed // 2
    spec_kw: dict[str, Any] = {
        "spatial_dims": dims,
        "channels": fp.channels,
        "denoise": overrides.get("denoise") or "none",
    }
    if is_ct:
        spec_kw.update(normalise="window", window=(-1000.0, 1000.0))
        reasons.append("CT data: fixed window -1000..1000 HU")
    if native <= 64:
        # Tiny images (MedMNIST) carry no empty border worth cropping, and cropping would change their scale.
        spec_kw["crop_foreground"] = False
    batch = overrides.get("batch_size") or (32 if n_train < 1500 else 64)
    if dims == 3:
        batch = overrides.get("batch_size") or (8 if n_train < 500 else 16)
    lr = float(overrides.get("lr") or 2e-3)
    if world_size > 1:
        if overrides.get("batch_size"):
            if batch < world_size:
                raise ConfigError(f"--batch-size {batch} is the global batch: it needs at least {world_size}")
            batch = batch // world_size * world_size
        else:
            batch *= world_size
            if not overrides.get("lr"):
                lr *= math.sqrt(world_size)
        reasons.append(
            f"{world_size} processes: global batch {batch} ({batch // world_size} per process), peak lr {lr:g}"
        )
    arch = overrides.get("arch") or "compact"
    modality = max(fp.modalities, key=lambda m: fp.modalities[m]) if fp.modalities else None
    modal_preset = preset_for_modality(modality)
    aug = overrides.get("augment") or modal_preset or ("light" if n_train >= 2000 else "standard")
    why = (
        f"modality {modality}"
        if modal_preset and not overrides.get("augment")
        else f"{n_train} training samples"
    )
    reasons.append(f"{why}: augmentation '{aug}'; batch {batch}")
    amp = overrides.get("amp") or "auto"
    mix = overrides.get("mix") or "none"
    plan = Plan(
        arch=arch,
        arch_kwargs={},
        spec=PreprocessSpec(**spec_kw, size=(native,) * dims),
        batch_size=int(batch),
        epochs=int(overrides.get("epochs") or target_epochs(n_train)),
        lr=lr,
        weight_decay=float(overrides.get("weight_decay", 0.05)),
        augment=aug,
        amp=resolve_amp(amp, device),
        channels_last=True,
        ema=bool(overrides.get("ema", True)),
        patience=int(overrides.get("patience") or 0),
        label_smoothing=float(overrides.get("label_smoothing", 0.0)),
        reasons=reasons,
        mix=mix,
        mix_alpha=check_mix(mix, overrides.get("mix_alpha")),
    )
    if mix != "none":
        reasons.append(f"batch mixing '{mix}' with alpha {plan.mix_alpha:g}")
    if slabs:
        plan = as_slices_as_channels(
            plan, fp, slabs, "--slices-as-channels", bool(overrides.get("batch_size"))
        )
    return plan


def as_slices_as_channels(plan: Plan, fp: Fingerprint, slabs: int, why: str, keep_batch: bool) -> Plan:
    """Turn a 3D plan into its 2.5D twin: ``slabs`` axial slabs of each volume become the channels of a 2D
    network at the volumes' in-plane size (see :mod:`medclf.preprocess`). A batch the planner chose for
    3D grows 4x (unless ``keep_batch``): a 2D step costs a fraction of a 3D one."""
    if slabs < 2:
        raise ConfigError("--slices-as-channels needs at least 2 slices")
    native = min(fp.median_shape[1:])
    spec = {**plan.spec.to_dict(), "spatial_dims": 2, "channels": slabs, "slices_as_channels": slabs}
    spec["size"] = (native, native)
    plan.spec = PreprocessSpec.from_dict(spec)
    if not keep_batch:
        plan.batch_size *= 4
    plan.reasons.append(f"2.5D ({why}): {slabs} axial slabs of each volume as channels of a 2D network")
    return plan


def resolve_amp(amp: str, device: str = "cpu") -> str:
    """'auto' -> bf16 where the hardware runs it natively (AVX-512 BF16/AMX CPUs, Ampere+ GPUs), else off."""
    if amp != "auto":
        return amp
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "off"
    except (AttributeError, RuntimeError):
        return "off"


def arch_kwargs_for(arch: str, size: int, dims: int) -> dict[str, Any]:
    if arch.startswith("compact"):
        kw: dict[str, Any] = {"stem_stride": 1 if size <= 64 else 2}
        if dims == 3 and arch == "compact":
            kw["width"] = 16  # 3D convolutions cost ~size times more: halve the width
        return kw
    if arch.startswith("resnet"):
        return {"small_input": size <= 64}
    return {}


def choose_size_and_epochs(
    plan: Plan,
    *,
    n_train: int,
    budget_s: float,
    fp: Fingerprint,
    overrides: dict[str, Any],
    device: str = "cpu",
    world_size: int = 1,
) -> Plan:
    """Pick the largest input size whose measured epoch time allows the target epochs within ``budget_s``,
    then the number of epochs that fits. Explicit ``size``/``epochs`` are kept.

    With ``world_size`` processes, throughput is measured for one process at its share of the batch and
    counted ``world_size`` times at an assumed 90 % scaling efficiency (gradient all-reduce), so the epoch
    time is about 1/world_size of one process's. Volumes whose smallest 3D size cannot fit the budget fall
    back to 2.5D (:func:`as_slices_as_channels`) unless ``slices_as_channels`` or ``size`` was set."""
    dims = plan.spec.spatial_dims
    native = min(fp.median_shape[1:]) if plan.spec.slices_as_channels else min(fp.median_shape)
    want_epochs = int(overrides.get("epochs") or target_epochs(n_train))
    if overrides.get("size"):
        candidates = [int(overrides["size"])]
    else:
        pool = SIZES_2D if dims == 2 else SIZES_3D
        # Upsampling tiny images up to 2x gives the network room (MedMNIST); never beyond the native size
        # otherwise: that adds compute, not information.
        cap = max(native * 2, 64) if native < 64 else native
        cap = min(cap, 256 if dims == 2 else 96)
        candidates = sorted(
            {s for s in pool if s <= cap} | ({native} if native <= cap else set()), reverse=True
        )
    # Resolution usually buys more than the last epochs do: accept a size once 60 % of the target
    # epochs fit (measured on simulated MRI, 600 cases: 64 px x 100 epochs beat 28 px x 120 clearly).
    min_epochs = want_epochs if overrides.get("epochs") else max(1, int(0.6 * want_epochs))
    chosen = None
    per_process = max(1, plan.batch_size // world_size)
    efficiency = 0.9 if world_size > 1 else 1.0
    for size in candidates:
        kw = arch_kwargs_for(plan.arch, size, dims)
        ips = measure_throughput(plan, size, kw, device=device, batch_size=per_process)
        ips *= world_size * efficiency
        epoch_s = n_train / ips
        fits = epoch_s * min_epochs <= budget_s
        if fits or size == candidates[-1]:
            chosen = (size, kw, ips, epoch_s, fits)
            break
    assert chosen is not None
    size, kw, ips, epoch_s, fits = chosen

    def replan(changed: Plan) -> Plan:
        return choose_size_and_epochs(
            changed,
            n_train=n_train,
            budget_s=budget_s,
            fp=fp,
            overrides=overrides,
            device=device,
            world_size=world_size,
        )

    if not fits and dims == 3 and overrides.get("slices_as_channels") is None and not overrides.get("size"):
        slabs = max(2, min(DEFAULT_SLABS, fp.median_shape[0]))
        why = f"3D at {size}^3 runs {ips:.1f} volumes/s, too slow for {min_epochs} epochs in the budget"
        return replan(as_slices_as_channels(plan, fp, slabs, why, bool(overrides.get("batch_size"))))
    if not fits and dims == 2 and plan.arch in NARROWER and not overrides.get("arch"):
        # Even the smallest size cannot run 60 % of the target epochs: a narrower network (about a quarter
        # of the compute) that gets through the epochs beats a wide one stopped early (PneumoniaMNIST, 3
        # minutes on an AVX2 CPU without bf16: compact ran 5 epochs to AUC 0.968).
        narrower = NARROWER[plan.arch]
        plan.reasons.append(
            f"{plan.arch} at {size} px runs {ips:.0f} img/s: {min_epochs} epochs do not fit the budget; "
            f"switching to the narrower {narrower}"
        )
        plan.arch = narrower
        return replan(plan)
    plan.spec = PreprocessSpec(**{**plan.spec.to_dict(), "size": (size,) * dims, "extra": {}})
    plan.arch_kwargs = {**kw, **overrides.get("arch_kwargs", {})}
    plan.throughput, plan.epoch_seconds = ips, epoch_s
    if overrides.get("epochs"):
        plan.epochs = int(overrides["epochs"])
    else:
        fit = int(budget_s // max(epoch_s, 1e-6))
        plan.epochs = int(max(1, min(fit, math.ceil(want_epochs * 1.5))))
        plan.reasons.append(
            f"size {size}: {ips:.0f} img/s measured -> {epoch_s:.1f} s/epoch; {plan.epochs} epochs fit the "
            f"{budget_s / 60:.1f} min left (target {want_epochs})"
        )
    if not plan.patience:
        plan.patience = max(8, plan.epochs // 3)
    return plan


def measure_throughput(
    plan: Plan,
    size: int,
    arch_kwargs: dict[str, Any],
    *,
    device: str = "cpu",
    steps: int = 3,
    batch_size: int | None = None,
) -> float:
    """Training images per second of this plan's network at ``size`` on this machine (random data), at
    ``batch_size`` (default: the plan's)."""
    dims = plan.spec.spatial_dims
    bs = batch_size or plan.batch_size
    model = create_model(plan.arch, plan.spec.channels, 2, dims, **arch_kwargs).to(device)
    x = torch.rand(bs, plan.spec.channels, *([size] * dims), device=device)
    y = torch.randint(0, 2, (bs,), device=device)
    if plan.channels_last:
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.amp)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def step() -> None:
        with torch.autocast(dev_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: oneDNN picks its kernels on the first call
    if dev_type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if dev_type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    # ~10% of a real step goes to batching, augmentation and bookkeeping that this benchmark skips.
    return 0.9 * bs * steps / dt
