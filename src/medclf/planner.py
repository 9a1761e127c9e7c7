"""From a dataset fingerprint and a time budget to a training plan, in the spirit of nnU-Net's planner.

The fingerprint is measured on a random subset of decoded samples (sizes, dimensionality, colour, formats,
modality, intensity) plus the label counts. Rules turn it into a preprocessing spec, an architecture, a
batch size, an augmentation preset and, after a short timed benchmark of the chosen network on this
machine, the number of epochs that fits the budget. Explicit user settings always win over the rules.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from medclf.augment import check_mix, preset_for_modality
from medclf.data.samples import SampleSet
from medclf.errors import ConfigError, DataError, InputRejected
from medclf.models import create_model
from medclf.preprocess import PreprocessSpec

# How intensities reach 0..1: auto (CT: a fixed HU window; 8-bit colour photographs: fixed 0..255; else
# each image's own 0.5/99.5 percentiles), percentile, or fixed (0..255, 8-bit images).
NORMALISE_CHOICES = ("auto", "percentile", "fixed")
SIZES_2D = (28, 32, 48, 64, 96, 128, 160, 192, 224, 256)
SIZES_3D = (28, 32, 48, 64, 96, 128)
# The planner's fallback when even its smallest input size is too slow for the budget (2D).
NARROWER = {"compact-l": "compact", "compact": "compact-s"}
# Axial slabs of the automatic 2.5D fallback: ~1 cm each over a head, thin enough for a lesion to show.
DEFAULT_SLABS = 16
# New plans put the compact networks' stem max-pool before its batch norm and ReLU (fewer memory-bound
# passes at full resolution; ``benchmarks/stem_order.py``). It only applies where the stem pools (inputs
# above 64 px); ``MEDCLF_STEM_POOL_FIRST=0`` restores the old order for comparisons. Bundles record the choice
# in their architecture arguments, so flipping it never changes how an existing bundle is rebuilt.
STEM_POOL_FIRST = os.environ.get("MEDCLF_STEM_POOL_FIRST", "1") == "1"


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
    # Share of the probed images whose values are whole numbers in 0..255 (8-bit photographs, MedMNIST).
    eight_bit_fraction: float = 0.0

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
    # The freeze schedule (medclf.training.probe): the share of epochs that train the output layer only,
    # and the backbone's learning-rate factor afterwards. Bundles made before it: 0 (none), 1.
    linear_probe: float = 0.0
    backbone_lr: float = 1.0
    # Batch mixing (see medclf.augment.MIX_METHODS) and its Beta(alpha, alpha); bundles made before it: none.
    mix: str = "none"
    mix_alpha: float = 0.0
    # PyTorch intra-op threads the run started with (medclf.threads); None in bundles made before it.
    threads: int | None = None
    # Shortcut mitigation (medclf.mitigation): "on"/"off", and the acquisition group keys training batches
    # are balanced over within each class. Bundles made before it: off, none.
    shortcut_mitigation: str = "off"
    balance_by: list[str] = field(default_factory=list)
    # One class per image: "balanced" cross-entropy (each class weighs as much as the others) or "none" (the
    # training prior stands). Bundles made before it: balanced.
    class_weights: str = "balanced"

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
    shapes, channels, colour, eight_bit = [], [], [], []
    formats, modalities = Counter[str](), Counter[str]()
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
        eight_bit.append(_is_eight_bit(img.pixels))
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
        eight_bit_fraction=float(np.mean(eight_bit)),
    )


def _is_colourful(px: np.ndarray) -> bool:
    # JPEG chroma noise makes "grey" RGB files differ by a few levels: call it colour only when it shows.
    rng = float(px.max() - px.min()) or 1.0
    return float(np.abs(px[0] - px[1]).mean() + np.abs(px[1] - px[2]).mean()) / rng > 0.02


def _is_eight_bit(px: np.ndarray) -> bool:
    return bool(px.min() >= 0 and px.max() <= 255 and np.array_equal(px, np.round(px)))


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
    spec_kw = _spec_kwargs(fp, overrides, reasons)
    batch, lr = _batch_and_lr(dims, n_train, overrides, world_size, reasons)
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
        class_weights=overrides.get("class_weights") or "balanced",
    )
    if mix != "none":
        reasons.append(f"batch mixing '{mix}' with alpha {plan.mix_alpha:g}")
    if slabs:
        plan = as_slices_as_channels(
            plan, fp, slabs, "--slices-as-channels", bool(overrides.get("batch_size"))
        )
    return plan


def _spec_kwargs(fp: Fingerprint, overrides: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    """The preprocessing spec's arguments that the data decides (all but the size)."""
    is_ct = fp.modalities.get("CT", 0) > fp.n_probed // 2
    spec_kw: dict[str, Any] = {
        "spatial_dims": fp.spatial_dims,
        "channels": fp.channels,
        "denoise": overrides.get("denoise") or "none",
    }
    normalise = check_normalise(overrides.get("normalise"))
    photographs = fp.channels == 3 and fp.eight_bit_fraction > 0.5
    if normalise == "fixed" and fp.eight_bit_fraction <= 0.5:
        raise ConfigError(
            "--normalise fixed scales 0..255 to 0..1 and needs 8-bit images; most of these are not "
            "(use percentile)"
        )
    if is_ct and normalise == "auto":
        spec_kw.update(normalise="window", window=(-1000.0, 1000.0))
        reasons.append("CT data: fixed window -1000..1000 HU")
    elif normalise == "fixed" or (normalise == "auto" and photographs):
        # A colour photograph's brightness and colour balance are part of what it shows (a fundus
        # photograph's pigment and exposure, a lesion's redness): scaling each image to its own
        # percentiles would remove them. BENCHMARKS.md, RetinaMNIST.
        spec_kw.update(normalise="window", window=(0.0, 255.0))
        why = "--normalise fixed" if normalise == "fixed" else "8-bit colour photographs"
        reasons.append(f"{why}: intensities scaled by the fixed range 0..255, not per image")
    if min(fp.median_shape) <= 64:
        # Tiny images (MedMNIST) carry no empty border worth cropping, and cropping would change their scale.
        spec_kw["crop_foreground"] = False
    return spec_kw


def check_normalise(value: str | None) -> str:
    """``--normalise`` as the planner reads it (None: ``auto``); :class:`ConfigError` for anything else."""
    normalise = value or "auto"
    if normalise not in NORMALISE_CHOICES:
        raise ConfigError(f"--normalise must be one of {', '.join(NORMALISE_CHOICES)}, not {normalise!r}")
    return normalise


def _batch_and_lr(
    dims: int, n_train: int, overrides: dict[str, Any], world_size: int, reasons: list[str]
) -> tuple[int, float]:
    """The global batch and the peak learning rate, scaled for ``world_size`` processes (see
    :func:`initial_plan`)."""
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
    return batch, lr


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
        if STEM_POOL_FIRST and kw["stem_stride"] > 1:
            kw["stem_pool_first"] = True
        if dims == 3 and arch == "compact":
            kw["width"] = 16  # 3D convolutions cost ~size times more: halve the width
        return kw
    if arch.startswith("resnet"):
        return {"small_input": size <= 64}
    return {}


class _Probe:
    """Throughput timings on this machine within a time allowance, shared by every re-plan of one planning
    run. Past the allowance a network's throughput at another size is estimated from its nearest measured
    size, scaled by the pixels (voxels) the network processes after its stem."""

    def __init__(self, allowance_s: float | None) -> None:
        self.t0 = time.perf_counter()
        self.allowance_s = allowance_s
        self.measured: dict[tuple[Any, ...], dict[float, float]] = {}
        self.n_measured = self.n_estimated = 0

    def left(self) -> float:
        if self.allowance_s is None:
            return math.inf
        return self.allowance_s - (time.perf_counter() - self.t0)

    def ips(
        self, plan: Plan, size: int, kw: dict[str, Any], device: str, batch_size: int, *, force: bool = False
    ) -> tuple[float, bool]:
        """(images/s, estimated?) of ``plan``'s network at ``size``; ``force``: time it even past the
        allowance (with the fewest steps)."""
        dims = plan.spec.spatial_dims
        group = (plan.arch, dims, plan.spec.channels, batch_size, plan.amp)
        work = _pixels(size, kw, dims)
        seen = self.measured.setdefault(group, {})
        if work in seen:
            return seen[work], False
        if seen and self.left() <= 0 and not force:
            near = min(seen, key=lambda w: abs(math.log(w / work)))
            self.n_estimated += 1
            return seen[near] * near / work, True
        ips = measure_throughput(
            plan, size, kw, device=device, batch_size=batch_size, max_seconds=max(self.left(), 0.5)
        )
        seen[work] = ips
        self.n_measured += 1
        return ips, False

    def predict(self, plan: Plan, size: int, kw: dict[str, Any], batch_size: int) -> float | None:
        """Images/s at ``size`` scaled from the nearest measured size (an upper bound for smaller sizes:
        fixed per-step costs weigh more on small inputs)."""
        dims = plan.spec.spatial_dims
        seen = self.measured.get((plan.arch, dims, plan.spec.channels, batch_size, plan.amp))
        if not seen:
            return None
        work = _pixels(size, kw, dims)
        near = min(seen, key=lambda w: abs(math.log(w / work)))
        return seen[near] * near / work


def _pixels(size: int, kw: dict[str, Any], dims: int) -> float:
    return float((size / int(kw.get("stem_stride", 1))) ** dims)


def choose_size_and_epochs(
    plan: Plan,
    *,
    n_train: int,
    budget_s: float,
    fp: Fingerprint,
    overrides: dict[str, Any],
    device: str = "cpu",
    world_size: int = 1,
    planning_s: float | None = None,
) -> Plan:
    """Pick the largest input size whose measured epoch time allows the target epochs within ``budget_s``,
    then the number of epochs that fits. Explicit ``size``/``epochs`` are kept.

    With ``world_size`` processes, throughput is measured for one process at its share of the batch and
    counted ``world_size`` times at an assumed 90 % scaling efficiency (gradient all-reduce), so the epoch
    time is about 1/world_size of one process's. Volumes whose smallest 3D size cannot fit the budget fall
    back to 2.5D (:func:`as_slices_as_channels`) unless ``slices_as_channels`` or ``size`` was set.

    ``planning_s`` bounds the timing probe (default: no bound): once spent, throughput at further sizes is
    estimated from the sizes already measured. Sizes that a measurement, scaled by pixels, shows cannot fit
    are skipped without being timed; the size finally chosen is always timed."""
    probe = _Probe(planning_s)
    plan = _choose(plan, n_train, budget_s, fp, overrides, device, world_size, probe)
    plan.reasons.append(
        f"timing probe: {time.perf_counter() - probe.t0:.1f} s, {probe.n_measured} network/size pair(s) "
        f"timed, {probe.n_estimated} estimated"
        + (f" (allowance {planning_s:.0f} s)" if planning_s is not None else "")
    )
    return plan


def _choose(
    plan: Plan,
    n_train: int,
    budget_s: float,
    fp: Fingerprint,
    overrides: dict[str, Any],
    device: str,
    world_size: int,
    probe: _Probe,
    from_smallest: bool = False,
) -> Plan:
    """:func:`choose_size_and_epochs` with a shared probe. ``from_smallest``: time the smallest size first
    and start the search at the largest size that timing (scaled by pixels: pessimistic for larger sizes)
    says fits; the narrower-network fallback uses it, as its wider twin just failed at the smallest size."""
    want_epochs = int(overrides.get("epochs") or target_epochs(n_train))
    search = _SizeSearch(
        plan=plan,
        probe=probe,
        device=device,
        n_train=n_train,
        budget_s=budget_s,
        # Resolution usually buys more than the last epochs do: accept a size once 60 % of the target
        # epochs fit (measured on simulated MRI, 600 cases: 64 px x 100 epochs beat 28 px x 120 clearly).
        min_epochs=want_epochs if overrides.get("epochs") else max(1, int(0.6 * want_epochs)),
        per_process=max(1, plan.batch_size // world_size),
        scale=world_size * (0.9 if world_size > 1 else 1.0),
    )
    chosen = search.run(_candidate_sizes(plan, fp, overrides), from_smallest)
    fallback = _fallback(plan, chosen, fp, overrides, search.min_epochs)
    if fallback is not None:
        changed, narrower = fallback
        return _choose(changed, n_train, budget_s, fp, overrides, device, world_size, probe, narrower)
    return _apply_choice(plan, chosen, overrides, budget_s, want_epochs)


def _candidate_sizes(plan: Plan, fp: Fingerprint, overrides: dict[str, Any]) -> list[int]:
    """Input sizes to try, largest first: the size asked for, or the planner's sizes up to a cap."""
    if overrides.get("size"):
        return [int(overrides["size"])]
    dims = plan.spec.spatial_dims
    native = min(fp.median_shape[1:]) if plan.spec.slices_as_channels else min(fp.median_shape)
    pool = SIZES_2D if dims == 2 else SIZES_3D
    # Upsampling tiny images up to 2x gives the network room (MedMNIST: 28 -> 48 px); never beyond the native
    # size otherwise: that adds compute, not information.
    cap = native * 2 if native < 64 else native
    cap = min(cap, 256 if dims == 2 else 96)
    return sorted({s for s in pool if s <= cap} | ({native} if native <= cap else set()), reverse=True)


class _Chosen(NamedTuple):
    size: int
    arch_kwargs: dict[str, Any]
    ips: float  # images/s of all processes together
    epoch_s: float
    fits: bool  # the minimum epochs fit the budget
    estimated: bool  # the throughput is scaled from other sizes, not timed


@dataclass
class _SizeSearch:
    """The search for the largest input size at which ``min_epochs`` of ``plan``'s network fit the budget."""

    plan: Plan
    probe: _Probe
    device: str
    n_train: int
    budget_s: float
    min_epochs: int
    per_process: int  # each process's share of the batch
    scale: float  # processes times their scaling efficiency

    def fits(self, ips: float) -> bool:
        return self.n_train / (ips * self.scale) * self.min_epochs <= self.budget_s

    def predicted_fits(self, size: int) -> bool:
        """True when there is no timing to predict from."""
        kw = arch_kwargs_for(self.plan.arch, size, self.plan.spec.spatial_dims)
        predicted = self.probe.predict(self.plan, size, kw, self.per_process)
        return predicted is None or self.fits(predicted)

    def run(self, candidates: list[int], from_smallest: bool) -> _Chosen:
        """The first of ``candidates`` (largest first) that fits, else the smallest."""
        plan, probe, dims = self.plan, self.probe, self.plan.spec.spatial_dims
        i = 0
        if from_smallest and len(candidates) > 1:
            smallest = candidates[-1]
            probe.ips(
                plan, smallest, arch_kwargs_for(plan.arch, smallest, dims), self.device, self.per_process
            )
            i = next(
                j
                for j, size in enumerate(candidates)
                if self.predicted_fits(size) or j == len(candidates) - 1
            )
        while i < len(candidates):
            size = candidates[i]
            kw = arch_kwargs_for(plan.arch, size, dims)
            ips, estimated = probe.ips(plan, size, kw, self.device, self.per_process)
            fits = self.fits(ips)
            if fits or i == len(candidates) - 1:
                if estimated:  # the choice is timed, not guessed (a few steps past the allowance)
                    ips, estimated = probe.ips(plan, size, kw, self.device, self.per_process, force=True)
                    fits = self.fits(ips)
                ips *= self.scale
                return _Chosen(size, kw, ips, self.n_train / ips, fits, estimated)
            # Skip the sizes that even the optimistic pixel-scaled prediction says cannot fit.
            i += 1
            while i < len(candidates) - 1 and not self.predicted_fits(candidates[i]):
                i += 1
        raise AssertionError("no candidate size")


def _fallback(
    plan: Plan, chosen: _Chosen, fp: Fingerprint, overrides: dict[str, Any], min_epochs: int
) -> tuple[Plan, bool] | None:
    """When even the smallest size does not fit: the plan to search again (2.5D for volumes, a narrower
    network for 2D), and whether to start that search from the smallest size; None to keep ``chosen``."""
    dims = plan.spec.spatial_dims
    size, ips = chosen.size, chosen.ips
    if chosen.fits:
        return None
    if dims == 3 and overrides.get("slices_as_channels") is None and not overrides.get("size"):
        slabs = max(2, min(DEFAULT_SLABS, fp.median_shape[0]))
        why = f"3D at {size}^3 runs {ips:.1f} volumes/s, too slow for {min_epochs} epochs in the budget"
        return as_slices_as_channels(plan, fp, slabs, why, bool(overrides.get("batch_size"))), False
    if dims == 2 and plan.arch in NARROWER and not overrides.get("arch"):
        # Even the smallest size cannot run 60 % of the target epochs: a narrower network (about a quarter
        # of the compute) that gets through the epochs beats a wide one stopped early (PneumoniaMNIST, 3
        # minutes on an AVX2 CPU without bf16: compact ran 5 epochs to AUC 0.968).
        narrower = NARROWER[plan.arch]
        plan.reasons.append(
            f"{plan.arch} at {size} px runs {ips:.0f} img/s: {min_epochs} epochs do not fit the budget; "
            f"switching to the narrower {narrower}"
        )
        plan.arch = narrower
        return plan, True
    return None


def _apply_choice(
    plan: Plan, chosen: _Chosen, overrides: dict[str, Any], budget_s: float, want_epochs: int
) -> Plan:
    """Set the chosen size, its network arguments, the throughput and the epochs that fit the budget."""
    size, kw, ips, epoch_s = chosen.size, chosen.arch_kwargs, chosen.ips, chosen.epoch_s
    dims = plan.spec.spatial_dims
    plan.spec = PreprocessSpec(**{**plan.spec.to_dict(), "size": (size,) * dims, "extra": {}})
    plan.arch_kwargs = {**kw, **overrides.get("arch_kwargs", {})}
    plan.throughput, plan.epoch_seconds = ips, epoch_s
    if overrides.get("epochs"):
        plan.epochs = int(overrides["epochs"])
    else:
        fit = int(budget_s // max(epoch_s, 1e-6))
        plan.epochs = int(max(1, min(fit, math.ceil(want_epochs * 1.5))))
        how = "estimated from the sizes timed" if chosen.estimated else "measured"
        plan.reasons.append(
            f"size {size}: {ips:.0f} img/s {how} -> {epoch_s:.1f} s/epoch; {plan.epochs} epochs fit the "
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
    max_seconds: float | None = None,
) -> float:
    """Training images per second of this plan's network at ``size`` on this machine (random data), at
    ``batch_size`` (default: the plan's).

    Two warm-up steps come first: oneDNN creates its kernels on the first call and AdamW its state on the
    first step, and either would make a timed step look several times slower than training's. Then up to
    ``steps`` timed steps, fewer once ``max_seconds`` have passed (at least one); their median is taken, so
    one step slowed by another process does not decide the plan."""
    dims = plan.spec.spatial_dims
    bs = batch_size or plan.batch_size
    model = create_model(plan.arch, plan.spec.channels, 2, dims, **arch_kwargs).to(device)
    x = torch.rand(bs, plan.spec.channels, *([size] * dims), device=device)
    y = torch.randint(0, 2, (bs,), device=device)
    if plan.channels_last:
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        # torch's stub of Module.to lacks its memory_format keyword.
        model = model.to(memory_format=fmt)  # type: ignore[call-overload]
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
        if dev_type == "cuda":
            torch.cuda.synchronize()

    t_start = time.perf_counter()
    step()
    step()
    times: list[float] = []
    while len(times) < steps:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
            break
    # ~10% of a real step goes to batching, augmentation and bookkeeping that this benchmark skips.
    return 0.9 * bs / float(np.median(times))
