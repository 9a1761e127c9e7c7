"""Dataset audit: counts, problems and warnings assembled into a readable report.

It works on the facts of one decoding pass (:func:`medclf.data.scan.scan`: content hash, near-duplicate
signature, size, channels, format, intensity statistics) without decoding again:

- duplicates: byte-identical samples and near copies (:func:`medclf.data.signatures.find_duplicates`);
- leakage: val/test samples that copy a training sample (:func:`medclf.data.scan.train_copy_matches`);
- :func:`audit` assembles counts, problems and warnings into an :class:`AuditReport`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from medclf import reporting
from medclf.data.samples import SPLITS, SampleSet
from medclf.data.scan import STAT_NAMES, ScanResult, scan, train_copy_matches
from medclf.data.shift import MIN_PER_SIDE, WARN_AUC, layout_features, split_shift
from medclf.data.shortcuts import check_shortcuts
from medclf.data.signatures import NEAR_THRESHOLD, DuplicateGroup, find_duplicates

if TYPE_CHECKING:
    from rich.console import Console

# Thresholds for warnings: a ratio above which class imbalance deserves attention, and how much sizes
# may vary before resizing to one input size distorts some images heavily.
_IMBALANCE_WARN = 3.0
_SIZE_SPREAD_WARN = 4.0


@dataclass
class AuditReport:
    """What :func:`audit` found. :meth:`to_dict` is JSON-ready; :meth:`render` prints it."""

    data: dict[str, Any]
    scan: ScanResult = field(repr=False)
    train_copies: np.ndarray = field(repr=False)
    groups: list[DuplicateGroup] = field(repr=False, default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return list(self.data["warnings"])

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.data))

    def write_json(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")
        return p

    def render(self, console: Console | None = None, *, max_warnings: int = 12) -> None:
        """Show the counts per class and split, an issues summary and the warnings: on ``console`` when given
        (``medclf audit`` prints the report on stdout), else through the active reporter
        (:mod:`medclf.reporting`; nothing, unless a caller installed one)."""
        rep = reporting.current() if console is None else reporting.ConsoleReporter(console)
        d = self.data
        rep.print(_counts_table(d))
        rep.print(_issues_table(d))
        _render_findings(rep, d.get("findings"))
        _render_content(rep, d)
        _render_shortcuts(rep, d.get("shortcuts"))
        rep.print(f"[dim]scanned {d['n_samples']} samples in {d['scan_seconds']:.1f} s[/]")
        _render_warnings(rep, d["warnings"], max_warnings)


def _counts_table(d: dict[str, Any]) -> Table:
    splits = list(d["counts"])
    t = Table(title=f"Samples per class and split — {escape(d['source'])}", title_justify="left")
    t.add_column("class")
    for s in splits:
        t.add_column(s, justify="right")
    t.add_column("total", justify="right")
    classes = d["classes"]
    for c in classes:
        row = [d["counts"][s].get(c, 0) for s in splits]
        t.add_row(escape(c), *map(str, row), str(sum(row)))
    totals = [sum(d["counts"][s].values()) for s in splits]
    t.add_row("[bold]total[/]", *map(str, totals), str(sum(totals)), end_section=True)
    t.add_row(
        "imbalance (max/min)",
        *[_fmt_ratio(d["imbalance_ratio"].get(s)) for s in splits],
        "",
    )
    return t


def _issues_table(d: dict[str, Any]) -> Table:
    dup = d["duplicates"]
    copies = d["train_copies"]
    it = Table(title="Issues", title_justify="left")
    it.add_column("check")
    it.add_column("found", justify="right")
    it.add_column("detail")
    it.add_row("unreadable files", str(len(d["unreadable"])), _top_reasons(d["unreadable"]))
    it.add_row(
        "exact duplicate groups",
        str(dup["exact_groups"]),
        f"{dup['exact_cross_split_groups']} cross splits; {dup['exact_redundant_files']} redundant files",
    )
    it.add_row(
        "near duplicate groups",
        str(dup["near_groups"]),
        f"{dup['near_cross_split_groups']} cross splits (correlation >= {d['near_threshold']})",
    )
    for s, c in copies["per_split"].items():
        it.add_row(
            f"{s} copies of train",
            str(c["total"]),
            f"{c['exact']} exact + {c['near_only']} near, of {c['of']} ({_pct(c['total'], c['of'])})",
        )
    what = "different sets of findings" if d.get("task") == "multilabel" else "different classes"
    it.add_row("label conflicts", str(len(d["label_conflicts"])), f"same picture, {what}")
    it.add_row("constant images", str(d["constant_images"]), "no content to learn from")
    shift = d.get("split_shift")
    if shift and shift["results"]:
        worst = max(shift["results"], key=lambda r: r["auc"])
        it.add_row(
            "split shift (class-wise)",
            str(sum(r["shifted"] for r in shift["results"])),
            f"of {len(shift['results'])} split/class pairs tell apart from train (AUC >= "
            f"{shift['warn_auc']}, higher on small sets); highest {worst['auc']:.2f} "
            f"({escape(worst['split'])}, {escape(worst['cls'])})",
        )
    if d["patients"]["with_ids"]:
        it.add_row("patients in several splits", str(d["patients"]["crossing_splits"]), "")
    return it


def _render_findings(rep: reporting.Reporter, f: dict[str, Any] | None) -> None:
    """Multi-label data: images per number of findings and the most frequent pairs."""
    if f:
        by_n = ", ".join(f"{k}: {v}" for k, v in f["images_by_number_of_findings"].items())
        top = "; ".join(f"{escape(' + '.join(p['findings']))} {p['images']}" for p in f["top_pairs"][:5])
        rep.print(f"[bold]findings per image[/] {by_n}   [bold]most frequent pairs[/] {top or '-'}")


def _render_content(rep: reporting.Reporter, d: dict[str, Any]) -> None:
    """Sizes, channels, formats and modes, one line each."""
    sizes = "; ".join(
        f"{k}: per axis min {_fmt_size(v['min'])}, median {_fmt_size(v['median'])}, max "
        f"{_fmt_size(v['max'])}; most common {_fmt_size(v['most_common'][0]['size'])} "
        f"({v['most_common'][0]['count']})"
        for k, v in d["sizes"].items()
    )
    rep.print(f"[bold]sizes[/] {sizes or '-'}")
    rep.print(
        "[bold]channels[/] "
        + escape(_fmt_counts(d["channels"]))
        + "   [bold]formats[/] "
        + escape(_fmt_counts(d["formats"]))
        + "   [bold]modes[/] "
        + escape(_fmt_counts(d["modes"]))
    )


def _render_warnings(rep: reporting.Reporter, warnings: list[str], max_warnings: int) -> None:
    if warnings:
        rep.print("[bold yellow]Warnings[/]")
        for w in warnings[:max_warnings]:
            rep.print(f"  [yellow]![/] {escape(w)}")
        if len(warnings) > max_warnings:
            rep.print(f"  ... and {len(warnings) - max_warnings} more (see the JSON report)")
    else:
        rep.print("[green]No warnings.[/]")


def _render_shortcuts(rep: reporting.Reporter, sc: dict[str, Any] | None) -> None:
    """The shortcut check as a table: per class, the cue-only AUC and the cues that carry it."""
    if not sc or not sc.get("checked") or not sc.get("per_class"):
        return
    from medclf.data.shortcuts import cue_words

    t = Table(
        title=f"Shortcut check — can acquisition cues alone predict the class? (flag: AUC >= "
        f"{sc['threshold']}, lower bound >= {sc.get('lower_bound', '-')})",
        title_justify="left",
    )
    t.add_column("class")
    t.add_column("cue-only AUC (95% CI)", justify="right")
    t.add_column("intensity style AUC", justify="right")
    t.add_column("cues")
    for cls, c in sc["per_class"].items():
        if c["auc"] is None:
            t.add_row(escape(cls), "-", "-", f"too few samples ({c['n']})")
            continue
        ci = c.get("ci") or [float("nan"), float("nan")]
        mark = "[bold red]" if c["flagged"] else ""
        t.add_row(
            escape(cls),
            f"{mark}{c['auc']:.2f} ({ci[0]:.2f}-{ci[1]:.2f})",
            "-" if c.get("style_auc") is None else f"{c['style_auc']:.2f}",
            escape(", ".join(f"{cue_words(k)} {c['cue_aucs'][k]:.2f}" for k in c["cues"][:3]) or "-"),
        )
    rep.print(t)


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def _fmt_counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items()) or "-"


def _fmt_size(size: list[float]) -> str:
    return "x".join(str(int(v)) if float(v).is_integer() else f"{v:.1f}" for v in size)


def _top_reasons(unreadable: list[dict[str, str]]) -> str:
    counts = Counter(u["reason"] for u in unreadable)
    return ", ".join(f"{r} {n}" for r, n in counts.most_common(4))


def audit(
    samples: SampleSet,
    *,
    scan_result: ScanResult | None = None,
    near_threshold: float = NEAR_THRESHOLD,
    workers: int = 2,
    progress: bool = True,
    check_shift: bool = True,
    check_shortcut: bool = True,
) -> AuditReport:
    """Audit ``samples`` (scanning them unless ``scan_result`` from :func:`scan` is given).

    Warnings come most serious first: leakage into val/test, label conflicts, unusable files, patient
    leakage, then duplicates within splits, distribution shift between splits, balance and heterogeneity.
    ``check_shift``: also ask whether each val/test class can be told apart from the same class in train
    (:mod:`medclf.data.shift`; a few seconds per class on large sets). ``check_shortcut``: also ask how
    well acquisition cues alone predict each class (:mod:`medclf.data.shortcuts`).
    """
    sr = scan_result if scan_result is not None else scan(samples, workers=workers, progress=progress)
    if len(sr) != len(samples):
        raise ValueError(f"scan_result has {len(sr)} samples, the sample set {len(samples)}")
    findings = _findings_summary(samples) if samples.task == "multilabel" else None
    counted = samples
    # Multi-label: duplicates, shift and shortcuts compare sets of findings (a conflict is the same picture
    # with two different sets); the counts above stay per finding.
    samples = samples.label_set_view()
    splits = [s for s in SPLITS if s in samples.splits]
    refs = [samples.display_ref(i) for i in range(len(samples))]
    # (priority, text): lower is more serious. The checks below add to it in a fixed order, which orders
    # warnings of the same priority.
    warn: list[tuple[int, str]] = []
    counts, imbalance = _balance_summary(counted, samples, splits, warn)
    unreadable = _unreadable_summary(samples, sr, refs, warn)
    groups, duplicates = _duplicate_summary(samples, sr, refs, near_threshold, warn)
    copies, per_split = _train_copy_summary(samples, sr, splits, near_threshold, warn)
    conflicts = _label_conflicts(samples, groups, refs, warn)
    patients = _patient_summary(samples, warn)
    shift = _split_shift_summary(samples, sr, copies, warn, progress) if check_shift else None
    shortcuts = _shortcut_summary(samples, sr, copies, warn) if check_shortcut else None
    content = _content_summary(sr, warn)
    data: dict[str, Any] = {
        "source": samples.source,
        "kind": samples.kind,
        "n_samples": len(samples),
        "classes": list(counted.classes),
        "task": counted.task,
        "findings": findings,
        "splits": splits,
        "counts": counts,
        "imbalance_ratio": imbalance,
        "unreadable": unreadable,
        "near_threshold": near_threshold,
        "duplicates": duplicates,
        "train_copies": {"per_split": per_split, "refs": [refs[i] for i in np.flatnonzero(copies)]},
        "label_conflicts": conflicts,
        "patients": patients,
        **content,
        "split_shift": shift,
        "shortcuts": shortcuts,
        "scan_seconds": round(sr.seconds, 3),
        "warnings": [text for _, text in sorted(warn, key=lambda w: w[0])],
    }
    return AuditReport(data=data, scan=sr, train_copies=copies, groups=groups)


def _balance_summary(
    counted: SampleSet, samples: SampleSet, splits: list[str], warn: list[tuple[int, str]]
) -> tuple[dict[str, dict[str, int]], dict[str, float | None]]:
    """Samples of ``counted`` per class and split (per finding for multi-label data) and each split's
    imbalance ratio; warns of missing classes, imbalance and samples of ``samples`` without a label."""
    counts = {s: counted.class_counts(s) for s in splits}
    imbalance: dict[str, float | None] = {}
    for s in splits:
        present = [v for v in counts[s].values() if v > 0]
        missing = [c for c, v in counts[s].items() if v == 0]
        ratio = round(max(present) / min(present), 3) if present and not missing else None
        imbalance[s] = ratio
        if missing and present:
            warn.append((5, f"{s}: no samples of class {', '.join(missing)}"))
        elif ratio is not None and ratio > _IMBALANCE_WARN:
            warn.append(
                (
                    6,
                    f"{s}: classes are imbalanced (largest/smallest = {ratio:.1f}); report balanced accuracy "
                    "and per-class recall, not only accuracy",
                )
            )
    unlabelled = int((~samples.known).sum())
    if unlabelled:
        warn.append((5, f"{_n(unlabelled, 'sample')} without a label"))
    return counts, imbalance


def _unreadable_summary(
    samples: SampleSet, sr: ScanResult, refs: list[str], warn: list[tuple[int, str]]
) -> list[dict[str, str]]:
    """The files that cannot be used, and why."""
    unreadable = [
        {
            "ref": refs[i],
            "split": samples.splits[i],
            "reason": sr.reasons[i] or "",
            "message": sr.messages[i] or "",
        }
        for i in sr.failed()
    ]
    if unreadable:
        warn.append(
            (
                2,
                f"{_n(len(unreadable), 'file')} cannot be used ({_top_reasons(unreadable)}); they are skipped",
            )
        )
    bugs = sum(u["reason"] in ("reader_error", "scan_error") for u in unreadable)
    if bugs:
        warn.append((2, f"{_n(bugs, 'file')} hit an internal reader error: please report this as a bug"))
    return unreadable


def _group_dict(samples: SampleSet, g: DuplicateGroup, refs: list[str]) -> dict[str, Any]:
    return {
        "kind": g.kind,
        "refs": [refs[i] for i in g.members],
        "splits": g.splits,
        "classes": [_class_name(samples, lab) for lab in g.labels],
        "crosses_splits": g.crosses_splits,
        "label_conflict": g.label_conflict,
    }


def _duplicate_summary(
    samples: SampleSet, sr: ScanResult, refs: list[str], near_threshold: float, warn: list[tuple[int, str]]
) -> tuple[list[DuplicateGroup], dict[str, Any]]:
    """Groups of byte-identical and of near-identical samples, and their summary."""
    groups = find_duplicates(
        sr.hashes,
        sr.signatures,
        sr.decoded,
        near_threshold=near_threshold,
        splits=samples.splits,
        labels=samples.labels,
    )
    exact = [g for g in groups if g.kind == "exact"]
    near = [g for g in groups if g.kind == "near"]
    exact_cross = sum(g.crosses_splits for g in exact)
    near_cross = sum(g.crosses_splits for g in near)
    redundant = sum(len(g.members) - 1 for g in exact)
    if exact:
        copies_txt = _n(redundant, "redundant copy", "redundant copies")
        warn.append(
            (
                4,
                f"{_n(len(exact), 'group')} of byte-identical files ({copies_txt}), {exact_cross} of them across splits",
            )
        )
    if near:
        warn.append(
            (
                4,
                f"{_n(len(near), 'group')} of near-identical images (re-encoded, resized or retouched copies, "
                f"correlation >= {near_threshold}), {near_cross} of them across splits",
            )
        )
    return groups, {
        "exact_groups": len(exact),
        "exact_cross_split_groups": exact_cross,
        "exact_redundant_files": redundant,
        "near_groups": len(near),
        "near_cross_split_groups": near_cross,
        "exact": [_group_dict(samples, g, refs) for g in exact],
        "near": [_group_dict(samples, g, refs) for g in near],
    }


def _label_conflicts(
    samples: SampleSet, groups: list[DuplicateGroup], refs: list[str], warn: list[tuple[int, str]]
) -> list[dict[str, Any]]:
    """Duplicate groups whose members carry different labels."""
    conflicts = [_group_dict(samples, g, refs) for g in groups if g.label_conflict]
    if conflicts:
        warn.append(
            (
                1,
                f"{_n(len(conflicts), 'duplicate group')} with different labels for the same picture (label noise)",
            )
        )
    return conflicts


def _train_copy_summary(
    samples: SampleSet, sr: ScanResult, splits: list[str], near_threshold: float, warn: list[tuple[int, str]]
) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """Leakage into val/test: which samples copy a training sample (directly), and the counts per split."""
    ex, nr, _ = train_copy_matches(samples, sr, near_threshold=near_threshold)
    copies = ex | nr
    per_split: dict[str, dict[str, int]] = {}
    for s in splits:
        if s == "train":
            continue
        m = np.array([x == s for x in samples.splits], dtype=bool)
        c = {
            "of": int(m.sum()),
            "exact": int((ex & m).sum()),
            "near_only": int((nr & ~ex & m).sum()),
            "total": int((copies & m).sum()),
        }
        per_split[s] = c
        if c["total"]:
            warn.append(
                (
                    0,
                    f"{c['total']} of {c['of']} {s} samples are copies of training samples ({c['exact']} exact, "
                    f"{c['near_only']} near): they inflate {s} scores; keep them out of model selection and "
                    "headline figures",
                )
            )
    return copies, per_split


def _content_summary(sr: ScanResult, warn: list[tuple[int, str]]) -> dict[str, Any]:
    """What the decoded samples hold: sizes, channels, formats, modes, constant images, intensities."""
    dec = np.flatnonzero(sr.decoded)
    sizes = _size_summary([shape for i in dec if (shape := sr.shapes[i]) is not None], warn)
    channels = {str(k): v for k, v in sorted(Counter(int(sr.channels[i]) for i in dec).items())}
    if len(channels) > 1:
        warn.append(
            (
                7,
                f"mixed channel counts ({_fmt_counts(channels)}): all images are converted to the model's channels",
            )
        )
    formats = dict(Counter(sr.formats[i] or "?" for i in dec).most_common())
    modes = dict(Counter(sr.modes[i] or "?" for i in dec).most_common())
    n_constant = int(sr.constant.sum())
    if n_constant:
        warn.append((5, f"{_n(n_constant, 'constant image')} (a single value everywhere): check them"))
    intensity = _intensity_summary(sr.stats[dec], warn)
    return {
        "sizes": sizes,
        "channels": channels,
        "formats": formats,
        "modes": modes,
        "constant_images": n_constant,
        "intensity": intensity,
    }


def _split_shift_summary(
    samples: SampleSet,
    sr: ScanResult,
    copies: np.ndarray,
    warn: list[tuple[int, str]],
    progress: bool = False,
) -> dict[str, Any]:
    is_3d = np.array([s is not None and len(s) == 3 and s[0] > 1 for s in sr.shapes], dtype=bool)
    usable = sr.decoded & ~sr.constant & ~copies
    found = split_shift(
        layout_features(sr.signatures, is_3d),
        samples.splits,
        samples.labels,
        usable,
        samples.classes,
        progress=progress,
    )
    for r in found:
        if r.shifted:
            warn.append(
                (
                    5,
                    f"{r.split} differs from train within class {r.cls}: a classifier tells them apart "
                    f"(AUC {r.auc:.2f}, {r.n_per_side} images each); scores on {r.split} measure another "
                    "distribution than training, and validation may not show it",
                )
            )
    return {"warn_auc": WARN_AUC, "min_per_side": MIN_PER_SIDE, "results": [r.to_dict() for r in found]}


def _shortcut_summary(
    samples: SampleSet, sr: ScanResult, copies: np.ndarray, warn: list[tuple[int, str]]
) -> dict[str, Any] | None:
    """The shortcut check on every usable labelled sample (copies of training images left out: a copy
    adds no new acquisition)."""
    if sr.cues is None:
        return None
    usable = np.flatnonzero(sr.decoded & ~copies)
    report = check_shortcuts(samples, sr.cues, indices=usable)
    for text in report.warnings():
        warn.append((1, text))
    return report.to_manifest()


def _findings_summary(samples: SampleSet) -> dict[str, Any]:
    """Multi-label data: images per number of findings, the co-occurrence of findings (images showing both,
    per pair, overall and per split) and the most frequent pairs."""
    known = samples.known
    per_image = samples.labels[known].sum(axis=1)
    both = samples.co_occurrence()
    names = samples.classes
    pairs: list[dict[str, Any]] = [
        {"findings": [names[i], names[j]], "images": int(both[i, j])}
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if both[i, j]
    ]
    pairs.sort(key=lambda p: -p["images"])
    return {
        "no_finding": int((per_image == 0).sum()),
        "images_by_number_of_findings": {
            str(k): int(v) for k, v in sorted(Counter(per_image.tolist()).items())
        },
        "co_occurrence": {"labels": list(names), "images": both.tolist()},
        "co_occurrence_per_split": {
            s: samples.co_occurrence(s).tolist() for s in SPLITS if s in samples.splits
        },
        "top_pairs": pairs[:10],
    }


def _patient_summary(samples: SampleSet, warn: list[tuple[int, str]]) -> dict[str, Any]:
    where: dict[str, set[str]] = {}
    for p, s in zip(samples.patient_ids, samples.splits, strict=True):
        if p is not None:
            where.setdefault(p, set()).add(s)
    crossing = sorted(p for p, ss in where.items() if len(ss) > 1)
    if crossing:
        warn.append(
            (3, f"{_n(len(crossing), 'patient')} with samples in more than one split (patient leakage)")
        )
    return {
        "with_ids": sum(p is not None for p in samples.patient_ids),
        "n_patients": len(where),
        "crossing_splits": len(crossing),
        "crossing_examples": crossing[:20],
    }


def _size_summary(shapes: list[tuple[int, ...]], warn: list[tuple[int, str]]) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for nd in sorted({len(s) for s in shapes}):
        arr = np.array([s for s in shapes if len(s) == nd])
        common = Counter(map(tuple, arr.tolist())).most_common(5)
        sizes[f"{nd}d"] = {
            "count": len(arr),
            "min": arr.min(axis=0).tolist(),
            "median": np.median(arr, axis=0).tolist(),
            "max": arr.max(axis=0).tolist(),
            "most_common": [{"size": list(s), "count": c} for s, c in common],
        }
        side_min, side_max = int(arr.min()), int(arr.max())
        if side_min > 0 and side_max / side_min > _SIZE_SPREAD_WARN:
            warn.append(
                (
                    7,
                    f"image sizes vary widely ({side_min} to {side_max} px per side): small images are upsampled "
                    "and large ones shrunk to the model's input size",
                )
            )
    if len(sizes) > 1:
        mix = ", ".join(f"{k} {v['count']}" for k, v in sizes.items())
        warn.append((5, f"mixed 2D images and 3D volumes: {mix}"))
    return sizes


def _intensity_summary(stats: np.ndarray, warn: list[tuple[int, str]]) -> dict[str, Any]:
    """min/median/max over samples of each per-sample statistic; warns when scales differ wildly."""
    out: dict[str, Any] = {}
    for k, name in enumerate(STAT_NAMES):
        col = stats[:, k][np.isfinite(stats[:, k])] if len(stats) else np.empty(0)
        if len(col):
            out[name] = {"min": float(col.min()), "median": float(np.median(col)), "max": float(col.max())}
    if len(stats):
        p99 = stats[:, STAT_NAMES.index("p99")]
        p99 = p99[np.isfinite(p99) & (p99 > 0)]
        if len(p99) >= 2:
            lo, hi = np.percentile(p99, [5, 95])
            # Two orders of magnitude between typical images: mixed modalities or units (0-1 vs 0-255).
            if lo > 0 and hi / lo > 100:
                warn.append(
                    (
                        7,
                        f"intensity scales differ widely (99th percentile {lo:.3g} to {hi:.3g} across images): "
                        "files may mix modalities or scalings",
                    )
                )
    return out


def _class_name(samples: SampleSet, label: int) -> str:
    return samples.classes[label] if 0 <= label < len(samples.classes) else "?"
