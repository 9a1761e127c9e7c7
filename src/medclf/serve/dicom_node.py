"""A DICOM node (Storage SCP) that classifies every image it receives: ``medclf dicom-node``.

It answers C-ECHO and accepts C-STORE of MR, CT, CR, DX and Secondary Capture images in the native
transfer syntaxes and every compressed one pydicom can decode here (RLE, JPEG, JPEG-LS, JPEG 2000,
HTJ2K, through the pylibjpeg plugins). Each received object takes the same path as a file given to
``medclf predict``:

1. the data set is written, exactly as the peer encoded it (never decoded by the network layer), to a
   temporary DICOM file;
2. :func:`medclf.io.read_image` guards and decodes it: content sniffing, header limits, truncation and
   decoder checks, never ``force=True`` on something that is not DICOM;
3. :meth:`medclf.bundle.Bundle.predict` preprocesses it with the bundle's own spec and classifies it.

A refused object gets a failure status (see :data:`STATUS_BY_REASON`) with a short ``ErrorComment`` and a
log line; the node keeps serving. For an accepted image two files appear in the output folder, each
written atomically (temporary file + ``os.replace``, the JSON last, so it marks a complete result):

``<SOPInstanceUID>.json``
    the predicted class, the probabilities, the model's sha256, the source Study/Series/SOP Instance UIDs,
    the time. It holds **no patient identifiers** (no name, id, birth date): it is meant for logs,
    dashboards and audit, which must not become a second copy of the patient record.
``<SOPInstanceUID>.sr.dcm``
    a Comprehensive SR document with new SOP Instance and Series UIDs, referencing the source instance
    in the Current Requested Procedure Evidence Sequence and in an IMAGE content item, holding the
    prediction as a CODE item and each class probability as a NUM item. The SR **does** copy the Patient
    module (name, id, birth date, sex) and the General Study module from the source: a PACS files an SR
    by patient and study, and an SR without them would be orphaned or mismatched. It carries the same
    identifiers the source image already carried to the same archive, nothing more.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, AllTransferSyntaxes, ComprehensiveSRStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import sop_class as sop

import medclf
from medclf.errors import ConfigError, InputRejected
from medclf.io import ReadLimits, read_image

if TYPE_CHECKING:
    from pynetdicom.events import Event
    from pynetdicom.server import ThreadedAssociationServer

    from medclf.bundle import Bundle

__all__ = [
    "ACCEPTED_STORAGE",
    "STATUS_BY_REASON",
    "DicomNode",
    "accepted_sop_classes",
    "build_sr",
    "decodable_transfer_syntaxes",
    "run_dicom_node",
]

log = logging.getLogger(__name__)

# The image storage SOP classes the node accepts, by modality.
ACCEPTED_STORAGE: dict[str, tuple[str, ...]] = {
    "MR": (
        sop.MRImageStorage,
        sop.EnhancedMRImageStorage,
        sop.LegacyConvertedEnhancedMRImageStorage,
    ),
    "CT": (
        sop.CTImageStorage,
        sop.EnhancedCTImageStorage,
        sop.LegacyConvertedEnhancedCTImageStorage,
    ),
    "CR": (sop.ComputedRadiographyImageStorage,),
    "DX": (
        sop.DigitalXRayImageStorageForPresentation,
        sop.DigitalXRayImageStorageForProcessing,
    ),
    "SC": (
        sop.SecondaryCaptureImageStorage,
        sop.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        sop.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        sop.MultiFrameTrueColorSecondaryCaptureImageStorage,
    ),
}

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

# C-STORE failure status (PS3.4 B.2.3, PS3.7 C) for each InputRejected reason; others: CANNOT_UNDERSTAND.
STATUS_BY_REASON: dict[str, int] = {
    "file_too_large": OUT_OF_RESOURCES,
    "too_large": OUT_OF_RESOURCES,
    "decompression_bomb": OUT_OF_RESOURCES,
    "no_pixels": DOES_NOT_MATCH_SOP_CLASS,
    "sop_class_mismatch": DOES_NOT_MATCH_SOP_CLASS,
    "wrong_dimensions": PROCESSING_FAILURE,  # a readable image this model cannot take (2D vs 3D)
}

# Class codes live in a private coding scheme ("99" prefix, PS3.16 8.2); described in the SR itself.
PRIVATE_SCHEME = "99MEDCLF"
SR_SERIES_NUMBER = 990
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "medclf:dicom-node")
_PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
_STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data pydicom can decode with the plugins installed here."""
    from pydicom.pixels import get_decoder

    out = []
    for ts in AllTransferSyntaxes:
        try:
            if get_decoder(ts).is_available:
                out.append(str(ts))
        except NotImplementedError:  # video, JPIP, multi-component JPEG 2000: no decoder exists
            continue
    return out


@dataclass(frozen=True)
class _Source:
    """The identifying UIDs of a received instance (what the JSON and the SR refer to)."""

    study: str
    series: str
    instance: str
    sop_class: str
    modality: str


class DicomNode:
    """A Storage SCP that classifies each received image with ``bundle`` and writes results to ``out_dir``.

    ``port=0`` picks a free port (see :attr:`port` once started). The model runs under a lock: the
    associations pynetdicom serves in parallel threads share one CPU-bound model.
    """

    def __init__(
        self,
        bundle: Bundle,
        out_dir: str | Path,
        *,
        ae_title: str = "MEDCLF",
        host: str = "127.0.0.1",
        port: int = 11112,
        limits: ReadLimits | None = None,
        max_associations: int = 4,
    ) -> None:
        self.bundle = bundle
        self.out_dir = Path(out_dir)
        self.host = host
        self.requested_port = int(port)
        self.limits = limits or ReadLimits()
        self._predict_lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._ae = AE()
        try:
            self._ae.ae_title = ae_title
        except ValueError as exc:
            raise ConfigError(f"invalid AE title {ae_title!r}: {exc}") from None
        self.ae_title = str(self._ae.ae_title)
        self._ae.require_called_aet = True  # answer only associations addressed to this node
        self._ae.maximum_associations = max_associations
        syntaxes = decodable_transfer_syntaxes()
        self._ae.add_supported_context(sop.Verification)
        for sop_class_uid in accepted_sop_classes():
            self._ae.add_supported_context(sop_class_uid, syntaxes)

    @property
    def port(self) -> int:
        """The port the node listens on (the real one when started with ``port=0``)."""
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    def start(self) -> DicomNode:
        """Start listening in background threads; returns ``self``."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_C_ECHO, self._handle_echo)]
        try:
            self._server = self._ae.start_server(
                (self.host, self.requested_port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host}:{self.requested_port}: {exc.strerror or exc}"
            ) from None
        log.info(
            "DICOM node %s listening on %s:%d, writing to %s",
            self.ae_title,
            self.host,
            self.port,
            self.out_dir,
        )
        if not _is_loopback(self.host):
            # DICOM associations carry no credentials: only the called AE title is checked.
            log.warning(
                "listening on %s, reachable from the network: any peer that knows the AE title %s can send "
                "images; restrict access with a firewall or bind to 127.0.0.1",
                self.host,
                self.ae_title,
            )
        return self

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> DicomNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event handlers (run in pynetdicom's association threads) --------------------------------------

    def _handle_echo(self, event: Event) -> int:
        log.info("C-ECHO from %s", _calling_ae(event))
        return SUCCESS

    def _handle_store(self, event: Event) -> Dataset:
        started = time.perf_counter()
        calling = _calling_ae(event)
        uid = _lo(str(event.request.AffectedSOPInstanceUID or ""))  # printable only: it goes to the log
        try:
            result = self._classify_and_write(event, calling, started)
        except InputRejected as exc:
            status = STATUS_BY_REASON.get(exc.reason, CANNOT_UNDERSTAND)
            message = _without_path(exc)
            log.warning(
                "refused %s from %s: 0x%04X %s: %s", uid or "(no UID)", calling, status, exc.reason, message
            )
            return _status(status, f"{exc.reason}: {message}")
        except OSError as exc:  # the output folder is full or unwritable: the peer may retry later
            log.error("cannot store the result for %s: %s", uid, exc)
            return _status(OUT_OF_RESOURCES, f"cannot write the result: {exc.strerror or exc}")
        except Exception:  # a bug must not take the node down; the peer gets a failure, the log the cause
            log.exception("processing %s from %s failed", uid, calling)
            return _status(PROCESSING_FAILURE, "internal error while classifying")
        log.info(
            "classified %s from %s as %s (p=%.3f) in %.0f ms",
            uid,
            calling,
            result["predicted"],
            result["confidence"],
            result["latency_ms"],
        )
        return _status(SUCCESS)

    def _classify_and_write(self, event: Event, calling: str, started: float) -> dict[str, Any]:
        request = event.request
        uid = _safe_uid(request.AffectedSOPInstanceUID, "the Affected SOP Instance UID")
        fd, tmp_name = tempfile.mkstemp(prefix="medclf-cstore-", suffix=".dcm")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(event.encoded_dataset(include_meta=True))
            image = read_image(tmp, limits=self.limits)
            header = dcmread(tmp, stop_before_pixels=True)
        finally:
            tmp.unlink(missing_ok=True)
        source = _source_of(header, request.AffectedSOPClassUID, uid)
        with self._predict_lock:
            (prediction,) = self.bundle.predict([image])
        if "error" in prediction:
            raise InputRejected(prediction["error"], reason=prediction.get("reason", "invalid"))
        now = dt.datetime.now(dt.timezone.utc)
        sr = build_sr(header, prediction, self.bundle, now=now, observer_name=self.ae_title)
        result = {
            "sop_instance_uid": source.instance,
            "series_instance_uid": source.series,
            "study_instance_uid": source.study,
            "sop_class_uid": source.sop_class,
            "modality": source.modality,
            "predicted": prediction["predicted"],
            "confidence": prediction["confidence"],
            "probabilities": prediction["probabilities"],
            **({"decision": prediction["decision"]} if "decision" in prediction else {}),
            "model": {"sha256": self.bundle.sha256, "arch": self.bundle.arch, "classes": self.bundle.classes},
            "received_at": now.isoformat(timespec="milliseconds"),
            "calling_ae": calling,
            "transfer_syntax": str(event.context.transfer_syntax),
            "sr": {
                "file": f"{source.instance}.sr.dcm",
                "sop_instance_uid": str(sr.SOPInstanceUID),
                "series_instance_uid": str(sr.SeriesInstanceUID),
            },
        }
        _write_atomic(
            self.out_dir / f"{source.instance}.sr.dcm", lambda fh: dcmwrite(fh, sr, enforce_file_format=True)
        )
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
        _write_atomic(self.out_dir / f"{source.instance}.json", lambda fh: fh.write(text.encode("utf-8")))
        return result

    def serve_forever(self) -> None:
        """Start (if needed) and block until Ctrl-C or SIGTERM, then shut down cleanly."""
        if self._server is None:
            self.start()
        stop = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            # Service managers stop with SIGTERM: treat it like Ctrl-C.
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            log.info("stopping the DICOM node")
            self.stop()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def run_dicom_node(
    bundle: str | Path,
    out: str | Path,
    *,
    port: int = 11112,
    ae_title: str = "MEDCLF",
    host: str = "127.0.0.1",
) -> None:
    """Load (and verify) ``bundle``, then serve until interrupted: what ``medclf dicom-node`` runs."""
    from medclf.bundle import load_bundle
    from medclf.engines import tune_allocator

    tune_allocator()
    node = DicomNode(load_bundle(bundle), out, ae_title=ae_title, host=host, port=port)
    node.serve_forever()


# -- the structured report ---------------------------------------------------------------------------------


def build_sr(
    source: Dataset,
    prediction: dict[str, Any],
    bundle: Bundle,
    *,
    now: dt.datetime | None = None,
    observer_name: str = "MEDCLF",
) -> Dataset:
    """A Comprehensive SR about ``source`` (a header, pixels not needed) holding ``prediction``.

    ``prediction`` is one entry of :meth:`Bundle.predict`. The SR has new SOP Instance and Series UIDs
    (the series UID is derived from the source series and the model, so all reports of one model about
    one series share an SR series), copies the Patient and General Study modules from ``source`` (see
    the module docstring for why), and references the source instance as evidence.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    src = _source_of(source, None, None)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: class names and copied names may be any script
    # SOP Common
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = _uid2_25(uuid.uuid4())
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S.%f")
    ds.TimezoneOffsetFromUTC = now.strftime("%z") or "+0000"
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "medclf model classes"
    ds.CodingSchemeIdentificationSequence = [scheme]
    # Patient and General Study: copied so that the archive files the SR with its study (type 2: present,
    # empty when the source lacks them).
    for keyword in _PATIENT_KEYWORDS + _STUDY_KEYWORDS:
        if keyword in source:
            ds.add(source[keyword])
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    ):
        if keyword not in ds:
            setattr(ds, keyword, "")
    # SR Document Series
    ds.Modality = "SR"
    ds.SeriesInstanceUID = _uid2_25(uuid.uuid5(_UID_NAMESPACE, f"sr-series|{src.series}|{bundle.sha256}"))
    ds.SeriesNumber = SR_SERIES_NUMBER
    ds.SeriesDescription = "medclf AI classification"
    ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime
    ds.ReferencedPerformedProcedureStepSequence = []
    # General Equipment
    ds.Manufacturer = "medclf"
    ds.ManufacturerModelName = _lo(f"{bundle.arch} {bundle.sha256[:12]}")
    ds.SoftwareVersions = medclf.__version__
    # SR Document General
    ds.InstanceNumber = _instance_number(source)
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []
    ds.CurrentRequestedProcedureEvidenceSequence = [_evidence(src)]
    # SR Document Content: the root container and its tree
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code(codes.LN.DiagnosticImagingReport)]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = _content_tree(src, prediction, bundle, observer_name)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _content_tree(src: _Source, prediction: dict[str, Any], bundle: Bundle, observer: str) -> list[Dataset]:
    device_uid = _uid2_25(uuid.uuid5(_UID_NAMESPACE, f"model|{bundle.sha256}"))
    predicted = str(prediction["predicted"])
    image = _item("INFERRED FROM", "IMAGE", codes.DCM.SourceOfMeasurement)
    image.ReferencedSOPSequence = [_sop_ref(src.sop_class, src.instance)]
    finding = _item("CONTAINS", "CODE", codes.DCM.Finding)
    finding.ConceptCodeSequence = [_code(_class_code(predicted))]
    finding.ContentSequence = [
        _text("HAS CONCEPT MOD", codes.DCM.AlgorithmName, f"medclf {bundle.arch}"),
        _text("HAS CONCEPT MOD", codes.DCM.AlgorithmVersion, bundle.sha256),
        image,
    ]
    probabilities = []
    for name, p in prediction["probabilities"].items():
        num = _item("CONTAINS", "NUM", codes.DCM.Probability)
        value = Dataset()
        value.NumericValue = f"{float(p):.6f}"
        value.MeasurementUnitsCodeSequence = [_code(codes.UCUM.NoUnits)]
        num.MeasuredValueSequence = [value]
        which = _item("HAS CONCEPT MOD", "CODE", codes.DCM.Finding)
        which.ConceptCodeSequence = [_code(_class_code(str(name)))]
        num.ContentSequence = [which]
        probabilities.append(num)
    summary = (
        f"medclf model {bundle.arch} (sha256 {bundle.sha256[:12]}) predicts '{predicted}' with probability "
        f"{float(prediction['confidence']):.3f}. Research software: not for diagnostic use."
    )
    if "decision" in prediction:  # the bundle's operating point (medclf recalibrate)
        d = prediction["decision"]
        summary += (
            f" Decision at the operating point: {d['label']} (P({d['group']}) {d['score']:.3f} "
            f"{'>=' if d['positive'] else '<'} threshold {d['threshold']:.4g})."
        )
    observer_type = _item("HAS OBS CONTEXT", "CODE", codes.DCM.ObserverType)
    observer_type.ConceptCodeSequence = [_code(codes.DCM.Device)]
    observer_uid = _item("HAS OBS CONTEXT", "UIDREF", codes.DCM.DeviceObserverUID)
    observer_uid.UID = device_uid
    return [
        observer_type,
        observer_uid,
        _text("HAS OBS CONTEXT", codes.DCM.DeviceObserverName, observer),
        _text("HAS OBS CONTEXT", codes.DCM.DeviceObserverManufacturer, "medclf"),
        _text("HAS OBS CONTEXT", codes.DCM.DeviceObserverModelName, f"{bundle.arch} {bundle.sha256[:12]}"),
        finding,
        *probabilities,
        _text("CONTAINS", codes.DCM.Summary, summary),
    ]


def _evidence(src: _Source) -> Dataset:
    """Hierarchical SOP Instance Reference (PS3.3 C.17.2.1): study > series > instance."""
    series = Dataset()
    series.SeriesInstanceUID = src.series
    series.ReferencedSOPSequence = [_sop_ref(src.sop_class, src.instance)]
    study = Dataset()
    study.StudyInstanceUID = src.study
    study.ReferencedSeriesSequence = [series]
    return study


def _sop_ref(sop_class: str, instance: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = instance
    return ref


def _item(relationship: str, value_type: str, concept: Code) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(concept)]
    return item


def _text(relationship: str, concept: Code, text: str) -> Dataset:
    item = _item(relationship, "TEXT", concept)
    item.TextValue = text
    return item


def _code(code: Code) -> Dataset:
    ds = Dataset()
    ds.CodeValue = code.value
    ds.CodingSchemeDesignator = code.scheme_designator
    if code.scheme_version:
        ds.CodingSchemeVersion = code.scheme_version
    ds.CodeMeaning = _lo(code.meaning)
    return ds


def _class_code(name: str) -> Code:
    """The private code of a class: its name when that is a valid short string (SH), else a hash of it."""
    clean = name.strip()
    if 0 < len(clean) <= 16 and "\\" not in clean and clean.isprintable() and clean.isascii():
        value = clean
    else:
        value = "C" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:15]
    return Code(value, PRIVATE_SCHEME, name)


def _lo(text: str) -> str:
    """A value fit for a Long String: at most 64 characters, no backslash or control characters."""
    clean = "".join(c if c.isprintable() and c != "\\" else " " for c in text)
    return clean[:64]


def _uid2_25(u: uuid.UUID) -> str:
    """A UID under the 2.25 root from a UUID (PS3.5 B.2): no organisation root needed."""
    return f"2.25.{u.int}"


def _instance_number(source: Dataset) -> int:
    try:
        return max(int(source.get("InstanceNumber") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _safe_uid(value: object, what: str) -> str:
    """A syntactically valid UID (digits and dots), safe to use in a file name, or InputRejected."""
    text = str(value or "").strip()
    if not UID(text).is_valid:
        raise InputRejected(f"{what} {text[:70]!r} is not a valid DICOM UID", reason="invalid_uid")
    return text


def _source_of(header: Dataset, affected_class: object, affected_instance: str | None) -> _Source:
    """The source's UIDs, checked for syntax and (when given) against the C-STORE request."""
    instance = _safe_uid(header.get("SOPInstanceUID"), "the SOP Instance UID")
    sop_class = _safe_uid(header.get("SOPClassUID"), "the SOP Class UID")
    if affected_instance is not None and instance != affected_instance:
        raise InputRejected(
            f"the data set's SOP Instance UID {instance} differs from the request's {affected_instance}",
            reason="uid_mismatch",
        )
    if affected_class is not None and sop_class != str(affected_class):
        raise InputRejected(
            f"the data set's SOP Class UID {sop_class} differs from the request's {affected_class}",
            reason="sop_class_mismatch",
        )
    return _Source(
        study=_safe_uid(header.get("StudyInstanceUID"), "the Study Instance UID"),
        series=_safe_uid(header.get("SeriesInstanceUID"), "the Series Instance UID"),
        instance=instance,
        sop_class=sop_class,
        modality=str(header.get("Modality", "") or ""),
    )


# -- small helpers -----------------------------------------------------------------------------------------


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:  # the command set has no character set: plain ASCII
        ds.ErrorComment = _lo(comment.encode("ascii", "replace").decode("ascii"))
    return ds


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _calling_ae(event: Event) -> str:
    try:
        return _lo(str(event.assoc.requestor.ae_title).strip())
    except AttributeError:
        return "?"


def _without_path(exc: InputRejected) -> str:
    """The refusal's message without the temporary file's path (meaningless to the peer)."""
    prefix = f"{exc.path}: " if exc.path else ""
    return exc.message[len(prefix) :] if prefix and exc.message.startswith(prefix) else exc.message


def _write_atomic(dest: Path, write: Any) -> None:
    """Write through ``write(fh)`` to a temporary file beside ``dest``, fsync, then ``os.replace``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def accepted_sop_classes() -> Iterable[str]:
    """Every SOP Class UID the node accepts for storage."""
    for classes in ACCEPTED_STORAGE.values():
        yield from classes
