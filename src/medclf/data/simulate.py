"""Simulated brain MRI (T1-weighted) for demos and tests: licence-clean, download-free, deterministic.

Every case is rendered from the ICBM 2009a nonlinear symmetric MNI152 template (T1 and white-matter
probability map) that ships inside the nilearn wheel, so nothing is ever downloaded. Three classes:

``normal``
    healthy anatomy, varied by pose, elastic shape, ventricle size and the acquisition.
``tumour``
    a solid, lobulated mass (deformed ellipsoid plus smooth random perturbation), mildly heterogeneous,
    often with a dark necrotic core and a thin bright (contrast-enhancing) rim, that pushes the surrounding
    tissue aside by a smooth radial deformation (mass effect: midline shift, compressed ventricle).
``oedema``
    a small lesion surrounded by a much larger vasogenic oedema: T1-hypointense, confined to white
    matter (the MNI white-matter probability map gates it), so it spreads in finger-like projections into
    the gyral white matter and spares the cortex.

The tumour and oedema models follow the idea of Prastawa et al. 2009 (Med Image Anal 13:297, simulated
brain tumours: a growing mass that deforms the brain, oedema that infiltrates along white matter), in a
much cheaper closed form.

The classes differ by *spatial pattern*, not by intensity statistics: every case draws its own
contrast (gamma), tissue contrast, brightness, multiplicative bias field, blur, Rician/Gaussian noise,
pose (rotation, scale, shift), elastic head deformation and slice level, and lesion contrast ranges
overlap between the classes. ``tests/test_simulate.py`` checks that a classifier on intensity histograms
stays near chance.

``difficulty`` (:data:`DIFFICULTIES`) sets how conspicuous the pathology is: ``"hard"`` (the default, and
the original simulator draw for draw: same seed, same bytes) keeps deliberately subtle cases (small or
solid low-contrast tumours, faint oedema, peritumoural oedema that mimics the oedema class);
``"moderate"`` (what ``medclf demo`` uses) draws larger, mostly necrotic and rim-enhancing masses with more
mass effect, wider and darker oedema, and less blur and noise. Anatomy, pose, contrast, bias field and
brightness vary as much at both levels, so intensity histograms stay uninformative at both.

Geometry is computed by *backward mapping*: each output pixel is mapped through pose -> elastic ->
ventricle size -> mass effect into template millimetres and the template is sampled there with
``scipy.ndimage.map_coordinates``. A 2D slice therefore only costs the pixels of that slice; the volume is
never warped. Scalp and skull (absent from the brain-extracted template) are synthesised from the
distance to the brain surface as T1-like layers (CSF, inner table, diploe, outer table, muscle with a
thicker temporalis laterally, subcutaneous fat, skin).

Conventions: 2D images are axial, anterior at the top and the patient's right on the image left
(radiological); 3D volumes are indexed ``[x, y, z]`` in RAS order (as stored in NIfTI) with an isotropic
affine of ``FOV_MM / size`` millimetres. Pixel values are float32 in ``[0, 1]``.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import nibabel as nib
import numpy as np
from PIL import Image as PILImage
from scipy import ndimage as ndi

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

__all__ = [
    "BRAIN",
    "CLASSES",
    "DIFFICULTIES",
    "FOV_MM",
    "LESION",
    "OEDEMA",
    "CaseParams",
    "Lesion",
    "make_dataset",
    "make_multilabel_dataset",
    "render_case",
    "render_case_with_labels",
    "sample_case_params",
    "simulate_case",
]

CLASSES = ("normal", "tumour", "oedema")
#: Values of the label maps from :func:`render_case_with_labels`.
BRAIN, OEDEMA, LESION = 1, 2, 3
SPLIT_NAMES = ("train", "val", "test")

#: Field of view of every output image, in millimetres (a standard clinical head FOV).
FOV_MM = 256.0
#: Axial slice levels (template z, mm) for 2D: from the third ventricle to the top of the lateral ventricles.
SLICE_BAND_MM = (2.0, 26.0)
#: Distance between adjacent slices of one patient (``slices_per_patient > 1``).
SLICE_GAP_MM = 3.0
#: Where the head is centred in template millimetres (centre of the brain's bounding box, in y).
HEAD_CENTRE_MM = np.array([0.0, -17.0, 10.0])

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class _Difficulty:
    """How conspicuous the pathology is: the ranges that :func:`sample_case_params` draws from.

    Intensities are in tissue units (0 = CSF, 1 = white matter); lengths in mm; ``p_*`` are probabilities.
    Only the lesion and the acquisition's degradation change with the difficulty: anatomy, pose, bias
    field, gamma and brightness vary as much at every level, so no global intensity rule appears.
    """

    tumour_radius: tuple[float, float]
    p_tumour_oedema: float  # a thin peritumoural oedema (the main tumour/oedema look-alike)
    tumour_oedema_extent: tuple[float, float]  # in tumour radii
    oedema_lesion_radius: tuple[float, float]
    oedema_radius: tuple[float, float]
    p_tumour_core: float
    tumour_core: tuple[float, float]
    tumour_rim: tuple[float, float]
    p_tumour_rim: float
    tumour_push: tuple[float, float]
    hypo_level: tuple[float, float]  # solid part, T1-hypointense (80 % of lesions)
    hyper_level: tuple[float, float]  # solid part, hyperintense (haemorrhage, enhancement)
    edge_mm: tuple[float, float]
    tumour_rim_mm: tuple[float, float]
    oedema_level: tuple[float, float]
    blur_mm: tuple[float, float]
    noise: tuple[float, float]


#: ``"hard"``: subtle cases on purpose (small or solid tumours, faint oedema, peritumoural oedema around
#: 40 % of tumours), the original simulator. ``"moderate"``: the same anatomy and acquisition variability,
#: with lesions that a radiologist would call obvious: larger masses, usually necrotic and rim-enhancing,
#: sharper and darker, with more mass effect; wider and darker oedema; less blur and noise.
DIFFICULTIES: dict[str, _Difficulty] = {
    "hard": _Difficulty(
        tumour_radius=(12.0, 28.0),
        p_tumour_oedema=0.4,
        tumour_oedema_extent=(1.15, 1.5),
        oedema_lesion_radius=(3.0, 8.0),
        oedema_radius=(16.0, 36.0),
        p_tumour_core=0.65,
        tumour_core=(0.35, 0.7),
        tumour_rim=(0.5, 1.0),
        p_tumour_rim=0.65,
        tumour_push=(0.35, 0.75),
        hypo_level=(0.2, 0.65),
        hyper_level=(1.05, 1.25),
        edge_mm=(0.6, 2.5),
        tumour_rim_mm=(1.2, 4.0),
        oedema_level=(0.1, 0.45),
        blur_mm=(0.0, 1.6),
        noise=(0.008, 0.04),
    ),
    "moderate": _Difficulty(
        tumour_radius=(16.0, 30.0),
        p_tumour_oedema=0.25,
        tumour_oedema_extent=(1.1, 1.35),
        oedema_lesion_radius=(3.5, 8.0),
        oedema_radius=(22.0, 38.0),
        p_tumour_core=0.85,
        tumour_core=(0.4, 0.7),
        tumour_rim=(0.75, 1.0),
        p_tumour_rim=0.85,
        tumour_push=(0.5, 0.85),
        hypo_level=(0.1, 0.5),
        hyper_level=(1.2, 1.4),
        edge_mm=(0.6, 1.5),
        tumour_rim_mm=(2.0, 4.0),
        oedema_level=(0.02, 0.3),
        blur_mm=(0.0, 1.1),
        noise=(0.008, 0.03),
    ),
}


def _difficulty(name: str) -> _Difficulty:
    if name not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {name!r}; expected one of {tuple(DIFFICULTIES)}")
    return DIFFICULTIES[name]


# ----------------------------------------------------------------------------------------------- template
@dataclass(frozen=True, eq=False)
class _Template:
    """The MNI152 template and everything derived from it once per process."""

    t1: np.ndarray  # uint8 (X, Y, Z), 1 mm, cropped to the brain plus a margin
    wm: np.ndarray  # uint8 white-matter probability * 255, same grid
    origin: np.ndarray  # template mm of voxel (0, 0, 0) of the cropped grid
    sdist: np.ndarray  # float32 signed distance to the brain surface (mm, > 0 outside), 2 mm grid
    sdist_origin: np.ndarray
    csf: float  # typical intensities in [0, 1]: lesions are specified relative to these
    gm: float
    wm_level: float
    vent_centre: np.ndarray  # centroid of the lateral ventricles (mm)
    candidates: np.ndarray  # (3, K) mm: lesion centres for 3D (deep, not CSF, supratentorial)


def _load_uint8(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine of a template file bundled in the nilearn package (no fetcher, no network)."""
    res = resources.files("nilearn") / "datasets" / "data" / name
    if not res.is_file():
        raise FileNotFoundError(
            f"{name} is not bundled with the installed nilearn; the brain MRI simulator needs nilearn>=0.10 "
            "(which ships the MNI152 2009a template inside its wheel)"
        )
    with resources.as_file(res) as path:
        img = cast("SpatialImage", nib.load(path))  # typed as any file-based image; NIfTI is spatial
        return np.asarray(img.dataobj, dtype=np.uint8), np.asarray(img.affine)


@lru_cache(maxsize=1)
def _template() -> _Template:
    """Load and pre-process the bundled template (under a second, once per process)."""
    t1, affine = _load_uint8(_TEMPLATE_FILES["t1"])
    wm, _ = _load_uint8(_TEMPLATE_FILES["wm"])
    if not np.allclose(np.diag(affine)[:3], 1.0):
        raise ValueError("expected the 1 mm MNI152 template")
    brain = t1 > 0  # the template is brain-extracted: zero outside the brain, no holes inside
    idx = np.argwhere(brain)
    # Crop to the brain plus a margin: less memory for the blurred copies, same result (outside is 0).
    lo = np.maximum(idx.min(0) - 6, 0)
    hi = np.minimum(idx.max(0) + 7, np.array(t1.shape))
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    t1c, wmc, brainc = (np.ascontiguousarray(a[crop]) for a in (t1, wm, brain))
    origin = affine[:3, 3] + lo
    # The signed distance is smooth, so a 2 mm grid is plenty and 20x cheaper than 1 mm. Padded by 40 mm
    # so that it keeps growing through the scalp; beyond the pad 'nearest' reads a value outside the head.
    pad = 20
    b2 = np.pad(ndi.binary_fill_holes(brainc[::2, ::2, ::2]), pad)
    sdist = (ndi.distance_transform_edt(~b2) - ndi.distance_transform_edt(b2)) * 2.0
    sdist_origin = origin - 2.0 * pad
    # Statistics on the 2 mm grid (plenty for medians and a centroid, 8x cheaper).
    t1_2 = t1c[::2, ::2, ::2].reshape(-1) / 255.0
    wm_2 = wmc[::2, ::2, ::2].reshape(-1) / 255.0
    g2 = np.indices(b2[pad:-pad, pad:-pad, pad:-pad].shape).reshape(3, -1) * 2.0 + origin[:, None]
    gm_level = float(np.median(t1_2[(wm_2 < 0.05) & (t1_2 > 0.5) & (t1_2 < 0.75)]))
    wm_level = float(np.median(t1_2[wm_2 > 0.9]))
    # Lateral ventricles: dark voxels in a box around the midline at the level of the ventricles.
    x, y, z = g2
    vent = (t1_2 > 0) & (t1_2 < 0.4) & (np.abs(x) < 30) & (y > -45) & (y < 35) & (z > -2) & (z < 35)
    vent_centre = g2[:, vent].mean(1)
    csf_level = float(np.median(t1_2[vent]))
    # Lesion centres for 3D cases: deep (>= 8 mm), supratentorial, not CSF.
    depth = -sdist[pad:-pad, pad:-pad, pad:-pad].reshape(-1)
    ok = (depth >= 8.0) & (z >= -25.0) & (z <= 70.0) & (t1_2 > 0.5 * (csf_level + gm_level))
    return _Template(
        t1=t1c,
        wm=wmc,
        origin=origin.astype(np.float64),
        sdist=sdist.astype(np.float32),
        sdist_origin=sdist_origin.astype(np.float64),
        csf=csf_level,
        gm=gm_level,
        wm_level=wm_level,
        vent_centre=vent_centre,
        candidates=g2[:, ok].astype(np.float64),
    )


@lru_cache(maxsize=2)
def _channels(sigma_vox: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1, white-matter map and brain mask low-pass filtered for sampling at a coarser spacing.

    Anti-aliasing: sampling a 1 mm template every 2-4 mm without a prefilter turns the cortical ribbon
    into jagged moiré. Cached per (rounded) filter width, so a dataset pays for it once.
    """
    tpl = _template()
    out = []
    for vol in (tpl.t1, tpl.wm, (tpl.t1 > 0).astype(np.uint8) * 255):
        f = vol.astype(np.float32) / 255.0
        if sigma_vox > 0:
            ndi.gaussian_filter(f, sigma_vox, output=f, mode="nearest", truncate=3.0)
        out.append(f)
    return out[0], out[1], out[2]


def _sample(vol: np.ndarray, origin: np.ndarray, step: float, pts: np.ndarray, order: int = 1) -> np.ndarray:
    """Values of ``vol`` (voxel ``i`` at ``origin + step * i`` mm) at points ``pts`` (3, N) in mm."""
    coords = (pts - origin[:, None]) / step
    # 'nearest' extends the template below its last slice (the cut brainstem), the only open face.
    return ndi.map_coordinates(vol, coords, order=order, mode="nearest", prefilter=order > 1)


# ------------------------------------------------------------------------------------------ random fields
@dataclass(frozen=True, eq=False)
class _Fourier:
    """A smooth random field: a sum of a few random plane waves (cheap to evaluate at any points).

    Random Fourier features give band-limited, stationary noise without building a grid, which is what we
    need for lesion outlines, texture and layer thickness evaluated only at the pixels we render.
    """

    k: np.ndarray  # (m, 3) wave vectors, rad/mm
    phase: np.ndarray  # (m,)
    amp: np.ndarray  # (m,)

    @staticmethod
    def draw(rng: np.random.Generator, wavelength: tuple[float, float], std: float, m: int = 8) -> _Fourier:
        d = rng.normal(size=(m, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength, size=m)
        k = d * (2 * np.pi / lam)[:, None]
        # Each cosine has variance amp^2 / 2, so this gives the field a standard deviation of ``std``.
        amp = np.full(m, std * np.sqrt(2.0 / m))
        return _Fourier(k=k, phase=rng.uniform(0, 2 * np.pi, size=m), amp=amp)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        # float32 halves the cost of the cosines; the phases stay accurate to ~1e-5 rad over a head.
        arg = self.k.astype(np.float32) @ pts.astype(np.float32) + self.phase.astype(np.float32)[:, None]
        return self.amp.astype(np.float32) @ np.cos(arg)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# ------------------------------------------------------------------------------------------------ params
@dataclass(frozen=True, eq=False)
class Lesion:
    """One simulated pathology; all lengths in mm, intensities in tissue units (0 = CSF, 1 = white matter)."""

    kind: str  # "tumour" or "oedema"
    centre: np.ndarray  # template mm
    radius: float  # tumour: mass radius; oedema: radius of the small central lesion
    axes: np.ndarray  # (3, 3) maps offsets to the unit-ball frame of the deformed ellipsoid
    shape: _Fourier  # lobulation of the outline (in units of the radius)
    texture: _Fourier  # mild heterogeneity
    edge_mm: float  # sharpness of the outline (small: well-defined, large: infiltrative)
    level: float  # solid-part intensity
    core: float  # relative radius of the necrotic core (0: none)
    core_level: float
    core_shape: _Fourier  # irregularity of the core outline
    rim: float  # strength of the enhancing rim (0: none)
    rim_mm: float  # its typical thickness
    rim_level: float
    push: float  # mass effect: fraction of the radius by which tissue is displaced
    push_decay: float  # decay length of the displacement, in radii
    oedema_radius: float  # extent of the surrounding oedema (0: none)
    oedema_shape: _Fourier
    oedema_level: float


@dataclass(frozen=True, eq=False)
class CaseParams:
    """Everything random about one simulated patient; :func:`render_case` turns it into pixels.

    Keeping the draw separate from the rendering lets a case be re-rendered without its lesion (same
    anatomy, pose and noise), e.g. to verify the lesion or build a ground-truth difference map.
    """

    label: str
    dims: int
    size: int
    n_slices: int
    rotation: np.ndarray  # (3, 3): output frame -> template frame
    scale: np.ndarray  # (3,) output mm per template mm
    centre: np.ndarray  # template mm at the output centre (2D: includes the slice level)
    elastic: tuple[_Fourier, ...]  # x, y, z displacement fields, mm
    ventricle: float  # > 0 enlarges the ventricles (atrophy), < 0 shrinks them
    tissue_contrast: float  # grey/white contrast change
    head_thickness: np.ndarray  # (7,) mm: CSF, inner table, diploe, outer table, muscle, fat, skin
    head_levels: np.ndarray  # (7,) intensities of those layers
    temporalis_mm: float
    head_field: _Fourier  # spatial variation of the layer thickness
    lesion: Lesion | None
    gamma: float
    bias: np.ndarray  # (20,) coefficients of a cubic polynomial log-bias field
    blur_mm: float  # Gaussian sigma
    brightness: float
    noise: float  # noise sigma (fraction of full scale)
    rician: bool
    noise_seed: int

    @property
    def spacing(self) -> float:
        """Pixel/voxel size in mm."""
        return FOV_MM / self.size


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx @ ry


def sample_case_params(
    label: str,
    *,
    rng: np.random.Generator,
    dims: int = 2,
    size: int = 96,
    n_slices: int = 1,
    difficulty: str = "hard",
) -> CaseParams:
    """Draw one simulated patient of class ``label`` (see the module docstring for what varies).

    ``difficulty`` (a key of :data:`DIFFICULTIES`) sets how conspicuous the lesion is; ``"hard"`` is the
    original simulator, draw for draw.
    """
    diff = _difficulty(difficulty)
    _check_case_args(label, dims, size, n_slices)
    tpl = _template()
    # The draws below happen in a fixed order (pose, elastic, anatomy, head, lesion, acquisition): changing
    # it changes every simulated dataset.
    rot, scale, centre = _draw_pose(rng, dims)
    # Elastic head deformation (the smooth random displacement field of Simard et al. 2003 / TorchIO's
    # RandomElasticDeformation), built from long-wavelength plane waves instead of spline control points:
    # as smooth, but evaluated only where we render. Wavelengths >= 70 mm keep displacement gradients < 1,
    # so the warp never folds.
    e_std = rng.uniform(1.0, 3.0)
    elastic = tuple(_Fourier.draw(rng, (70.0, 200.0), e_std, m=6) for _ in range(3))
    ventricle = rng.uniform(-0.06, 0.14)
    tissue_contrast = rng.uniform(-0.15, 0.2)
    head_thickness, head_levels, temporalis, head_field = _draw_head(rng)

    lesion = None
    if label != "normal":
        if dims == 2:
            pts, normal = _central_slice_points(size, rot, scale, centre, elastic, ventricle, tpl)
        else:
            pts, normal = tpl.candidates, np.zeros(3)
        half_extent = SLICE_GAP_MM * (n_slices - 1) / 2.0
        lesion = _draw_lesion(label, rng, tpl, pts, normal, half_extent, diff)

    return CaseParams(
        label=label,
        dims=dims,
        size=size,
        n_slices=n_slices,
        rotation=rot,
        scale=scale,
        centre=centre,
        elastic=elastic,
        ventricle=float(ventricle),
        tissue_contrast=float(tissue_contrast),
        head_thickness=head_thickness,
        head_levels=head_levels,
        temporalis_mm=float(temporalis),
        head_field=head_field,
        lesion=lesion,
        **_draw_acquisition(rng, diff),
    )


def _check_case_args(label: str, dims: int, size: int, n_slices: int) -> None:
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    if dims not in (2, 3):
        raise ValueError("dims must be 2 or 3")
    if not 16 <= size <= 1024:
        raise ValueError("size must be between 16 and 1024")
    if n_slices < 1 or (dims == 3 and n_slices != 1):
        raise ValueError("n_slices must be >= 1, and 1 for 3D")


def _draw_pose(rng: np.random.Generator, dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation (output -> template frame), scale and the template mm at the output centre.

    Rotation within ±10° (mostly in-plane for 2D: a tilted axial plane changes anatomy a lot), isotropic
    scale ±8% with a little anisotropy, a few mm of shift; 2D also draws the slice level.
    """
    deg = np.pi / 180
    if dims == 2:
        rot = _rotation(rng.uniform(-6, 6) * deg, rng.uniform(-4, 4) * deg, rng.uniform(-10, 10) * deg)
        level = rng.uniform(*SLICE_BAND_MM)
        shift = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), level - HEAD_CENTRE_MM[2]])
    else:
        rot = _rotation(*(rng.uniform(-10, 10, size=3) * deg))
        shift = rng.uniform(-8, 8, size=3)
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=3)
    return rot, scale, HEAD_CENTRE_MM + shift


def _draw_head(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, _Fourier]:
    """Scalp and skull layers: thickness (mm) and intensity of each, temporalis thickness, variation."""
    head_thickness = np.array(
        [
            rng.uniform(1.0, 2.5),  # subarachnoid CSF / meninges
            rng.uniform(1.2, 2.2),  # inner table (cortical bone: no signal)
            rng.uniform(1.5, 4.5),  # diploe (fatty marrow: bright)
            rng.uniform(1.0, 2.0),  # outer table
            rng.uniform(0.8, 2.0),  # galea / muscle
            rng.uniform(2.0, 5.5),  # subcutaneous fat (brightest on T1)
            rng.uniform(1.0, 2.0),  # skin
        ]
    )
    head_levels = np.array(
        [
            rng.uniform(0.10, 0.22),
            rng.uniform(0.02, 0.08),
            rng.uniform(0.45, 0.80),
            rng.uniform(0.02, 0.08),
            rng.uniform(0.30, 0.48),
            rng.uniform(0.75, 1.00),
            rng.uniform(0.45, 0.65),
        ]
    )
    temporalis = rng.uniform(1.5, 5.0)
    head_field = _Fourier.draw(rng, (80.0, 250.0), rng.uniform(0.05, 0.15))  # gentle, no lumps
    return head_thickness, head_levels, temporalis, head_field


def _central_slice_points(
    size: int,
    rot: np.ndarray,
    scale: np.ndarray,
    centre: np.ndarray,
    elastic: tuple[_Fourier, ...],
    ventricle: float,
    tpl: _Template,
) -> tuple[np.ndarray, np.ndarray]:
    """Template mm of the central 2D slice's pixels, and the slice normal: 2D lesion centres are drawn
    among these pixels, so the slices cut the lesion."""
    sp = FOV_MM / size
    g = (np.arange(size) - (size - 1) / 2.0) * sp
    yy, xx = np.meshgrid(-g, -g, indexing="ij")  # anterior up, patient right on the left
    out = np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)])
    pts = _geometry(out, rot, scale, centre, elastic, ventricle, tpl)
    return pts, rot[:, 2] / np.linalg.norm(rot[:, 2])


def _draw_acquisition(rng: np.random.Generator, diff: _Difficulty) -> dict[str, Any]:
    """The :class:`CaseParams` fields of the acquisition, drawn in this order.

    Gamma and brightness: scanner/protocol contrast; bias: receive-coil inhomogeneity modelled as a smooth
    multiplicative field, exp(cubic polynomial) as in TorchIO's RandomBiasField (the N3 model of Sled et
    al. 1998); Rician magnitude noise (Gudbjartsson & Patz 1995) or Gaussian.
    """
    gamma = float(np.exp(rng.uniform(np.log(0.7), np.log(1.5))))
    # Log-bias std ~0.05-0.25 over the head: max/min over the brain ~1.3 typically, up to ~2 (3T-like).
    bias_strength = rng.uniform(0.1, 0.9)
    bias = rng.normal(size=20) * bias_strength / np.sqrt(20.0)
    return {
        "gamma": gamma,
        "bias": bias,
        "blur_mm": float(rng.uniform(*diff.blur_mm)),
        "brightness": float(rng.uniform(0.6, 1.0)),
        "noise": float(rng.uniform(*diff.noise)),
        "rician": bool(rng.random() < 0.8),
        "noise_seed": int(rng.integers(0, 2**63 - 1)),
    }


def _draw_lesion(
    label: str,
    rng: np.random.Generator,
    tpl: _Template,
    pts: np.ndarray,
    normal: np.ndarray,
    half_extent: float,
    diff: _Difficulty,
) -> Lesion:
    """Draw size, shape and contrast, and a centre among ``pts`` (3, N) that lies in brain tissue.

    ``normal`` is the slice normal (template frame) for an off-plane offset; ``half_extent`` is half the
    thickness of a multi-slice stack, which a tumour must span.
    """
    tumour = label == "tumour"
    radius, oedema_radius = _draw_lesion_radii(tumour, rng, half_extent, diff)
    centre, radius = _draw_lesion_centre(tumour, rng, tpl, pts, normal, half_extent, radius)
    axes_rot = _rotation(*rng.uniform(-np.pi, np.pi, size=3))
    stretch = rng.uniform(0.75, 1.3, size=3)
    axes = np.diag(1.0 / stretch) @ axes_rot.T
    core, rim, push, decay = _draw_lesion_structure(tumour, rng, diff)
    # Solid-part contrast, the same distribution for both classes so intensity alone is ambiguous: mostly
    # T1-hypointense (between CSF and white matter), sometimes hyperintense (haemorrhage, enhancement).
    level = rng.uniform(*diff.hypo_level) if rng.random() < 0.8 else rng.uniform(*diff.hyper_level)
    # The keyword arguments are evaluated, and so drawn, in the order written.
    return Lesion(
        kind=label,
        centre=centre,
        radius=float(radius),
        axes=axes,
        shape=_Fourier.draw(rng, (0.8 * radius, 3.0 * radius), rng.uniform(0.06, 0.2)),
        texture=_Fourier.draw(rng, (4.0, 12.0), rng.uniform(0.04, 0.15), m=12),
        edge_mm=float(rng.uniform(*diff.edge_mm)),
        level=float(level),
        core=float(core),
        core_shape=_Fourier.draw(rng, (0.5 * radius, 1.5 * radius), rng.uniform(0.04, 0.12)),
        rim_mm=float(rng.uniform(*diff.tumour_rim_mm) if tumour else rng.uniform(0.8, 2.0)),
        core_level=float(rng.uniform(-0.1, 0.3)),  # necrosis / cyst: near CSF
        rim=float(rim),
        rim_level=float(rng.uniform(1.2, 1.6)),  # enhancement: brighter than white matter
        push=float(push),
        push_decay=float(decay),
        oedema_radius=float(oedema_radius),
        oedema_shape=_Fourier.draw(rng, (10.0, 40.0), 0.3, m=10),
        oedema_level=float(rng.uniform(*diff.oedema_level)),  # darker than white matter, often GM-like
    )


def _draw_lesion_radii(
    tumour: bool, rng: np.random.Generator, half_extent: float, diff: _Difficulty
) -> tuple[float, float]:
    """Radius of the mass (tumour) or of the small central lesion (oedema), and of the oedema (0: none)."""
    if tumour:
        radius = rng.uniform(*diff.tumour_radius)
        radius = max(radius, half_extent + 5.0)  # every slice of a multi-slice patient shows the mass
    else:
        radius = rng.uniform(*diff.oedema_lesion_radius)
    oedema_radius = 0.0
    if tumour and rng.random() < diff.p_tumour_oedema:  # many tumours carry a thin peritumoural oedema too
        oedema_radius = radius * rng.uniform(*diff.tumour_oedema_extent)
    elif not tumour:
        oedema_radius = max(rng.uniform(*diff.oedema_radius), half_extent + 10.0)
    return radius, oedema_radius


def _draw_lesion_centre(
    tumour: bool,
    rng: np.random.Generator,
    tpl: _Template,
    pts: np.ndarray,
    normal: np.ndarray,
    half_extent: float,
    radius: float,
) -> tuple[np.ndarray, float]:
    """A lesion centre among ``pts``, and the radius, shrunk where no candidate is deep enough for it."""
    # Candidate centres: tissue (not CSF), supratentorial, deep enough for the lesion to stay in the brain.
    depth = -_sample(tpl.sdist, tpl.sdist_origin, 2.0, pts)
    t1 = _sample(tpl.t1, tpl.origin, 1.0, pts).astype(np.float64) / 255.0
    wm = _sample(tpl.wm, tpl.origin, 1.0, pts).astype(np.float64) / 255.0
    tissue = (t1 > 0.5 * (tpl.csf + tpl.gm)) & (pts[2] > -25.0)
    for _ in range(10):
        need = 0.55 * radius + 4.0 if tumour else radius + 6.0
        ok = tissue & (depth >= need)
        if not tumour:
            ok &= wm > 0.35  # metastases sit at the grey/white junction or in white matter
        if ok.any():
            break
        radius *= 0.85
    else:
        ok = depth >= np.max(depth)
    i = rng.choice(np.flatnonzero(ok))
    # Off-plane offset: keep the lesion cut by the slice(s) rather than grazing them.
    dz_max = max(0.0, min(0.35 * radius, radius - half_extent - 3.0)) if tumour else min(2.0, radius / 2)
    return pts[:, i] + normal * rng.uniform(-dz_max, dz_max), radius


def _draw_lesion_structure(
    tumour: bool, rng: np.random.Generator, diff: _Difficulty
) -> tuple[float, float, float, float]:
    """Necrotic core (relative radius, 0: none), enhancing rim (strength, 0: none), mass effect and its
    decay length."""
    if tumour:
        has_core = rng.random() < diff.p_tumour_core
        core = rng.uniform(*diff.tumour_core) if has_core else 0.0
        rim = rng.uniform(*diff.tumour_rim) if rng.random() < diff.p_tumour_rim else 0.0
        push, decay = rng.uniform(*diff.tumour_push), rng.uniform(0.8, 1.6)
    else:
        has_core = rng.random() < 0.4
        core = rng.uniform(0.3, 0.6) if has_core else 0.0
        rim = rng.uniform(0.4, 1.0) if rng.random() < 0.5 else 0.0
        push, decay = rng.uniform(0.0, 0.25), rng.uniform(0.8, 1.5)
    return core, rim, push, decay


# ------------------------------------------------------------------------------------------------ render
def _geometry(
    out: np.ndarray,
    rot: np.ndarray,
    scale: np.ndarray,
    centre: np.ndarray,
    elastic: tuple[_Fourier, ...],
    ventricle: float,
    tpl: _Template,
) -> np.ndarray:
    """Map output mm (3, N) to template mm before any mass effect: pose -> elastic -> ventricle size."""
    p = rot @ (out / scale[:, None]) + centre[:, None]
    p = p + np.stack([field(p) for field in elastic])
    # Ventricle size (atrophy): a radial scaling about the ventricles that fades with a Gaussian;
    # r' = r (1 - a g(r)) stays monotonic for |a| < 1, so the warp never folds.
    d = p - tpl.vent_centre[:, None]
    g = np.exp(-(d**2).sum(0) / (2 * 28.0**2))
    return p - ventricle * g * d


def _mass_effect(p: np.ndarray, lesion: Lesion, tpl: _Template) -> np.ndarray:
    """Backward radial displacement: tissue shown at distance r from the mass came from nearer its centre.

    Inside the mass r' = (1 - a) r; outside the displacement a R decays as exp(-(r - R) / (lambda R)),
    and it is tapered to zero over the outer 15 mm of the brain because the skull does not move.
    """
    d = p - lesion.centre[:, None]
    r = np.sqrt((d**2).sum(0)) + 1e-6
    big_r = lesion.radius if lesion.kind == "tumour" else 0.5 * lesion.oedema_radius
    s = np.where(
        r < big_r,
        lesion.push * r,
        lesion.push * big_r * np.exp(-(r - big_r) / (lesion.push_decay * big_r)),
    )
    depth = -_sample(tpl.sdist, tpl.sdist_origin, 2.0, p)
    s *= np.clip(depth / 15.0, 0.0, 1.0)
    return p - s * d / r


def _apply_lesion(
    tissue: np.ndarray, p: np.ndarray, wm: np.ndarray, brain: np.ndarray, lesion: Lesion, tpl: _Template
) -> tuple[np.ndarray, np.ndarray]:
    """Paint oedema and the lesion into ``tissue`` (template intensities).

    Returns the new tissue and labels (0: unaffected, ``OEDEMA``: oedema, ``LESION``: the lesion itself).
    """
    csf, wml = tpl.csf, tpl.wm_level

    def level(u: float | np.ndarray) -> float | np.ndarray:  # tissue units -> template intensity
        return csf + u * (wml - csf)

    d = p - lesion.centre[:, None]
    dist = np.sqrt((d**2).sum(0))
    depth = -_sample(tpl.sdist, tpl.sdist_origin, 2.0, p)
    inside_brain = np.clip(depth / 3.0, 0.0, 1.0) * brain
    labels = np.zeros(tissue.shape, dtype=np.uint8)
    if lesion.oedema_radius > 0:
        # Vasogenic oedema follows white matter: an irregular ball gated by the WM probability, so it
        # reaches into gyral white matter in finger-like tongues and stops at the cortex.
        reach = lesion.oedema_radius * (1.0 + lesion.oedema_shape(p))
        o = _sigmoid((reach - dist) / (0.12 * lesion.oedema_radius))
        o *= np.clip((wm - 0.15) / 0.55, 0.0, 1.0) ** 0.7 * inside_brain
        tissue = tissue + o * (level(lesion.oedema_level) - tissue)
        labels[o > 0.4] = OEDEMA
    # Deformed ellipsoid: rho < 1 inside; the Fourier term lobulates the outline.
    rho = np.sqrt(((lesion.axes @ d) ** 2).sum(0)) / lesion.radius + lesion.shape(p)
    occ = _sigmoid((1.0 - rho) * lesion.radius / lesion.edge_mm) * inside_brain
    value = level(lesion.level * (1.0 + lesion.texture(p)))
    core_edge = lesion.core + lesion.core_shape(p)
    if lesion.core > 0:
        core = _sigmoid((core_edge - rho) * lesion.radius / 1.0)
        value = value + core * (level(lesion.core_level) - value)
    if lesion.rim > 0:
        # Enhancing wall: an irregular band of viable tumour just outside the necrotic core (or along the
        # outline of a solid mass), thickness varying around it like a real ring-enhancing lesion.
        at = core_edge if lesion.core > 0 else 0.9
        width = lesion.rim_mm * np.maximum(1.0 + 2.0 * lesion.texture(0.5 * p), 0.3)
        outward = np.maximum(rho - at, 0.0) * lesion.radius  # mm beyond the core's edge
        rim = _sigmoid((rho - at) * lesion.radius / 0.7) * np.exp(-((outward / width) ** 2))
        value = value + rim * lesion.rim * (level(lesion.rim_level) - value)
    tissue = tissue + occ * (value - tissue)
    labels[occ > 0.5] = LESION
    return tissue, labels


def _head(sd: np.ndarray, p: np.ndarray, params: CaseParams) -> np.ndarray:
    """Synthetic scalp and skull from the distance ``sd`` (mm) outside the brain surface."""
    var = 1.0 + params.head_field(p)
    thick = params.head_thickness[:, None] * var[None, :]
    # Temporalis muscle: thick over the temporal bone, i.e. lateral, mid-AP, below the vertex.
    x, y, z = p
    t = np.clip((np.abs(x) - 40.0) / 35.0, 0.0, 1.0)
    lateral = t * t * (3.0 - 2.0 * t) * np.exp(-(((y + 15.0) / 45.0) ** 2))  # smoothstep: no ridge
    lateral *= np.clip((55.0 - z) / 25.0, 0.0, 1.0)
    thick[4] += params.temporalis_mm * lateral
    bounds = np.cumsum(thick, axis=0)
    levels = np.append(params.head_levels, 0.0)  # air beyond the skin
    w = 0.3 * params.spacing  # edge softness ~ partial volume at the output resolution
    out = np.full(sd.shape, levels[0])
    for i in range(7):
        out += (levels[i + 1] - levels[i]) * _sigmoid((sd - bounds[i]) / w)
    return out


def _output_points(params: CaseParams) -> tuple[np.ndarray, tuple[int, ...]]:
    """Output pixel/voxel centres in output mm, and the array shape they fill."""
    n, sp = params.size, params.spacing
    g = (np.arange(n) - (n - 1) / 2.0) * sp
    if params.dims == 2:
        offs = (np.arange(params.n_slices) - (params.n_slices - 1) / 2.0) * SLICE_GAP_MM
        zz, yy, xx = np.meshgrid(offs, -g, -g, indexing="ij")  # anterior up, patient right on the left
        shape: tuple[int, ...] = (params.n_slices, n, n)
    else:
        xx, yy, zz = np.meshgrid(g, g, g, indexing="ij")  # RAS order, as stored in NIfTI
        shape = (n, n, n)
    return np.stack([xx.ravel(), yy.ravel(), zz.ravel()]), shape


def _bias_field(params: CaseParams, out: np.ndarray) -> np.ndarray:
    u = out / (FOV_MM / 2.0)
    powers = [[np.ones(u.shape[1]), a, a * a, a * a * a] for a in u]
    log_b = np.zeros(u.shape[1])
    t = 0
    for i in range(4):
        for j in range(4 - i):
            xy = powers[0][i] * powers[1][j]
            for k in range(4 - i - j):
                log_b += params.bias[t] * xy * powers[2][k]
                t += 1
    return np.exp(log_b - log_b.mean())  # zero-mean log field: brightness is drawn separately


def render_case(params: CaseParams, *, lesion: bool = True) -> np.ndarray:
    """Render ``params``: 2D -> (n_slices, size, size), 3D -> (size, size, size) float32 in [0, 1].

    ``lesion=False`` renders the same case with no pathology (and no mass effect) but identical anatomy,
    pose, acquisition and noise.
    """
    return render_case_with_labels(params, lesion=lesion)[0]


def render_case_with_labels(params: CaseParams, *, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`render_case`, plus a uint8 label map of the same shape.

    Labels: 0 outside the brain, ``BRAIN`` (1) brain, ``OEDEMA`` (2) oedema, ``LESION`` (3) the tumour or
    the lesion inside the oedema. Useful as ground truth, e.g. to check that a saliency map points at
    the pathology.
    """
    tpl = _template()
    sp = params.spacing
    # Anti-aliasing filter matched to the output spacing (FWHM ~ one output pixel), rounded for caching.
    sigma = round(max(0.0, np.sqrt(max(sp**2 - 1.0, 0.0)) / 2.355), 1)
    t1_vol, wm_vol, brain_vol = _channels(sigma)
    out, shape = _output_points(params)
    p = _geometry(out, params.rotation, params.scale, params.centre, params.elastic, params.ventricle, tpl)
    les = params.lesion if lesion else None
    q = _mass_effect(p, les, tpl) if les is not None and les.push > 0 else p
    t1 = _sample(t1_vol, tpl.origin, 1.0, q).astype(np.float64)
    wm = _sample(wm_vol, tpl.origin, 1.0, q).astype(np.float64)
    brain = _sample(brain_vol, tpl.origin, 1.0, q).astype(np.float64)
    sd = _sample(tpl.sdist, tpl.sdist_origin, 2.0, q).astype(np.float64)
    # Grey/white contrast differs between sequences and scanners: stretch around the GM level (smoothly
    # switched off towards CSF, so that sulci keep their shape).
    soft = np.clip((t1 - tpl.csf) / (tpl.gm - tpl.csf), 0.0, 1.0)
    tissue = t1 + params.tissue_contrast * (t1 - tpl.gm * brain) * soft
    labels = (brain > 0.5).astype(np.uint8) * BRAIN
    if les is not None:
        # Only points that the lesion or its oedema can reach need the (costly) random fields.
        reach = max(2.2 * les.radius + 3.0 * les.edge_mm, 2.2 * les.oedema_radius)
        near = np.flatnonzero(((p - les.centre[:, None]) ** 2).sum(0) < reach**2)
        tissue[near], les_labels = _apply_lesion(tissue[near], p[:, near], wm[near], brain[near], les, tpl)
        labels[near] = np.maximum(labels[near], les_labels)
    img = tissue
    outside = np.flatnonzero(brain < 0.999)  # scalp and skull only where the brain does not cover
    img[outside] += (1.0 - brain[outside]) * _head(sd[outside], p[:, outside], params)
    img = np.clip(img, 0.0, None) ** params.gamma
    img *= _bias_field(params, out)
    img = img.reshape(shape)
    if params.blur_mm > 0:
        # Mild blur (in mm, so a case looks the same at any size): softer reconstructions, motion.
        b = params.blur_mm / sp
        img = ndi.gaussian_filter(img, (0.0, b, b) if params.dims == 2 else b)
    img *= params.brightness
    noise_rng = np.random.default_rng(params.noise_seed)
    n1 = noise_rng.normal(0.0, params.noise, size=img.shape)
    if params.rician:
        # Magnitude of a complex signal with Gaussian noise on both channels (Rician; Rayleigh in air).
        n2 = noise_rng.normal(0.0, params.noise, size=img.shape)
        img = np.sqrt((img + n1) ** 2 + n2**2)
    else:
        img = img + n1
    return np.clip(img, 0.0, 1.0).astype(np.float32), labels.reshape(shape)


def simulate_case(
    label: str, *, rng: np.random.Generator, dims: int = 2, size: int = 96, difficulty: str = "hard"
) -> np.ndarray:
    """One simulated T1 brain MRI of class ``label``: 2D (size, size) or 3D (size, size, size), float32 in [0, 1].

    2D images are axial slices through the lateral ventricles (anterior up, radiological left/right);
    3D volumes are ``[x, y, z]`` in RAS order with ``FOV_MM / size`` mm voxels. ``difficulty``: see
    :data:`DIFFICULTIES`.
    """
    img = render_case(sample_case_params(label, rng=rng, dims=dims, size=size, difficulty=difficulty))
    return img[0] if dims == 2 else img


# ----------------------------------------------------------------------------------------------- dataset
def _split_counts(n: int, splits: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of ``n * fraction`` so the counts add up to ``n``."""
    raw = {k: n * v for k, v in splits.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    left = n - sum(counts.values())
    for k in sorted(raw, key=lambda k: (counts[k] - raw[k], list(raw).index(k)))[:left]:
        counts[k] += 1
    return counts


def _write_png(path: Path, img: np.ndarray) -> None:
    PILImage.fromarray(np.round(img * 255.0).astype(np.uint8)).save(path, format="PNG")


def _write_nifti(path: Path, vol: np.ndarray, spacing: float) -> None:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(np.array(vol.shape) - 1) / 2.0 * spacing  # scanner origin at the FOV centre
    img = nib.Nifti1Image(np.round(vol * 255.0).astype(np.uint8), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def make_dataset(
    out_dir: str | Path,
    *,
    n_per_class: int = 100,
    dims: int = 2,
    size: int = 96,
    seed: int = 0,
    splits: dict[str, float] | None = {"train": 0.7, "test": 0.3},  # noqa: B006 - read only, never mutated
    slices_per_patient: int = 1,
    manifest: bool = False,
    overwrite: bool = False,
    difficulty: str = "hard",
) -> Path:
    """Write a folder dataset of simulated brain MRI and return ``out_dir``.

    Layout: ``<out_dir>/<split>/<class>/<case>.png`` (2D, 8-bit greyscale) or ``.nii.gz`` (3D, uint8,
    affine of ``FOV_MM / size`` mm), or ``<out_dir>/<class>/<case>...`` when ``splits`` is ``None``.
    ``n_per_class`` counts patients; with ``slices_per_patient > 1`` (2D only) each patient gives that many
    adjacent axial slices (``SLICE_GAP_MM`` apart, same anatomy and pathology) named ``p0007_s2.png``,
    and all slices of a patient land in the same split. Splits are stratified by class. ``manifest``
    adds ``manifest.csv`` (``path,label,patient_id,split``; paths relative to ``out_dir``). Output is
    byte-identical for the same arguments. An existing non-empty ``out_dir`` is refused unless
    ``overwrite``, which replaces only what this function writes. ``difficulty`` (``"hard"`` or
    ``"moderate"``, see :data:`DIFFICULTIES`) sets how conspicuous the lesions are.
    """
    _difficulty(difficulty)  # refuse a bad name before touching the disk
    _check_dataset_args(n_per_class, dims, splits, slices_per_patient)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)

    n_total = n_per_class * len(CLASSES)
    root = np.random.SeedSequence(seed)
    order_seq, *case_seqs = root.spawn(1 + n_total)
    order_rng = np.random.default_rng(order_seq)
    # Patient ids are a random permutation so that an id reveals nothing about the class.
    ids = order_rng.permutation(n_total)
    labels = [c for c in CLASSES for _ in range(n_per_class)]
    split_of = _stratified_splits(order_rng, n_per_class, splits)

    rows: list[tuple[str, str, str, str]] = []
    for k in range(n_total):
        rng = np.random.default_rng(case_seqs[k])
        params = sample_case_params(
            labels[k], rng=rng, dims=dims, size=size, n_slices=slices_per_patient, difficulty=difficulty
        )
        pid = f"p{ids[k]:04d}"
        folder = out / split_of[k] / labels[k] if split_of[k] else out / labels[k]
        paths = _write_case(folder, pid, params)
        rows += [(p.relative_to(out).as_posix(), labels[k], pid, split_of[k]) for p in paths]
    if manifest:
        _write_manifest(out, sorted(rows))
    return out


def _check_dataset_args(
    n_per_class: int, dims: int, splits: dict[str, float] | None, slices_per_patient: int
) -> None:
    if n_per_class < 1:
        raise ValueError("n_per_class must be >= 1")
    if slices_per_patient < 1 or (dims == 3 and slices_per_patient != 1):
        raise ValueError("slices_per_patient must be >= 1, and 1 for 3D")
    if splits is not None:
        unknown = set(splits) - set(SPLIT_NAMES)
        if unknown or not splits:
            raise ValueError(f"split names must be among {SPLIT_NAMES}, got {sorted(splits)}")
        if any(v < 0 for v in splits.values()) or not np.isclose(sum(splits.values()), 1.0):
            raise ValueError("split fractions must be >= 0 and add up to 1")


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; a non-empty one is refused unless ``overwrite``, which removes only what
    :func:`make_dataset` writes."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass overwrite=True to replace a simulated dataset)")
        for name in (*SPLIT_NAMES, *CLASSES):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        (out / "manifest.csv").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _stratified_splits(
    order_rng: np.random.Generator, n_per_class: int, splits: dict[str, float] | None
) -> list[str]:
    """The split of each case (cases ordered class by class), stratified by class; ``""`` without splits."""
    split_of = [""] * (n_per_class * len(CLASSES))
    if splits is not None:
        for ci in range(len(CLASSES)):
            members = order_rng.permutation(np.arange(ci * n_per_class, (ci + 1) * n_per_class))
            start = 0
            for name, count in _split_counts(n_per_class, splits).items():
                for m in members[start : start + count]:
                    split_of[m] = name
                start += count
    return split_of


def _write_case(folder: Path, pid: str, params: CaseParams) -> list[Path]:
    """Render one patient into ``folder``: a NIfTI volume, or one PNG per slice; returns the files."""
    img = render_case(params)
    folder.mkdir(parents=True, exist_ok=True)
    if params.dims == 3:
        path = folder / f"{pid}.nii.gz"
        _write_nifti(path, img, params.spacing)
        return [path]
    names = [pid] if params.n_slices == 1 else [f"{pid}_s{s}" for s in range(params.n_slices)]
    paths = [folder / f"{name}.png" for name in names]
    for path, sl in zip(paths, img, strict=True):
        _write_png(path, sl)
    return paths


def _write_manifest(out: Path, rows: list[tuple[str, str, str, str]]) -> None:
    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "label", "patient_id", "split"])
        w.writerows(rows)


# ----------------------------------------------------------------------------------- multi-finding variant

#: Findings of the multi-label variant: a lesion (a tumour or an oedema, as the classes above) and, drawn
#: independently, atrophy (enlarged ventricles), so an image may show none, one or two findings.
FINDINGS = ("atrophy", "oedema", "tumour")
ATROPHY_VENTRICLE = (0.35, 0.5)  # beyond the healthy range (-0.06, 0.14) that sample_case_params draws
NO_FINDING = "No Finding"


def make_multilabel_dataset(
    out_dir: str | Path,
    *,
    n: int = 60,
    size: int = 32,
    seed: int = 0,
    splits: dict[str, float] = {"train": 0.7, "test": 0.3},  # noqa: B006 - read only, never mutated
    atrophy_rate: float = 0.4,
    difficulty: str = "moderate",
) -> Path:
    """Write a multi-label dataset of ``n`` simulated 2D brain MRI and return ``out_dir``.

    Layout as NIH ChestX-ray14 ships it: ``images/<case>.png`` and ``manifest.csv`` with
    ``path,label,patient_id,split`` where ``label`` holds the findings (:data:`FINDINGS`) joined by ``|``, or
    ``No Finding``. Each case draws a lesion class (normal, tumour or oedema, a third each) and, independently
    with probability ``atrophy_rate``, atrophy. Byte-identical for the same arguments; a non-empty
    ``out_dir`` is refused."""
    _difficulty(difficulty)
    if n < 1:
        raise ValueError("n must be >= 1")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    (out / "images").mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(seed)
    order_seq, *case_seqs = root.spawn(1 + n)
    order_rng = np.random.default_rng(order_seq)
    names = list(splits)
    counts = _split_counts(n, splits)
    split_of = order_rng.permutation([s for s in names for _ in range(counts[s])])
    rows: list[tuple[str, str, str, str]] = []
    for k in range(n):
        rng = np.random.default_rng(case_seqs[k])
        lesion = CLASSES[int(rng.integers(len(CLASSES)))]
        atrophy = bool(rng.random() < atrophy_rate)
        params = sample_case_params(lesion, rng=rng, dims=2, size=size, difficulty=difficulty)
        if atrophy:
            params = replace(params, ventricle=float(rng.uniform(*ATROPHY_VENTRICLE)))
        findings = sorted({lesion} - {"normal"} | ({"atrophy"} if atrophy else set()))
        pid = f"p{k:04d}"
        _write_png(out / "images" / f"{pid}.png", render_case(params)[0])
        rows.append((f"images/{pid}.png", "|".join(findings) or NO_FINDING, pid, str(split_of[k])))
    _write_manifest(out, rows)
    return out
