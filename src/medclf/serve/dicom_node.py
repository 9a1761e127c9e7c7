"""A DICOM node (Storage SCP) that classifies every image it receives: ``medclf dicom-node``.

It answers C-ECHO and accepts C-STORE of the image storage SOP classes of the modalities the bundle was
trained on (:func:`storage_modalities`: from the training data's fingerprint; a default set of radiology
modalities, US and MG included, when the training files carried no DICOM modality), in the native
transfer syntaxes and every compressed one pydicom can decode here (RLE, JPEG, JPEG-LS, JPEG 2000,
HTJ2K, through the pylibjpeg plugins). Every presentation context it rejects is logged with the reason.
Each received object takes the same path as a file given to ``medclf predict``:

1. the data set is written, exactly as the peer encoded it (never decoded by the network layer), to a
   temporary DICOM file;
2. :func:`medclf.io.read_image` guards and decodes it: content sniffing, header limits, truncation and
   decoder checks, never ``force=True`` on something that is not DICOM;
3. :meth:`medclf.predictor.Predictor.predict` preprocesses it with the bundle's own spec, classifies it and
   runs the bundle's out-of-distribution guard.

Who may connect (:class:`DicomNode` arguments, ``medclf dicom-node`` options): DICOM has no passwords,
so the node checks what it can: the called AE title, the calling AE title (``allowed_aets``), the peer's
address (``allowed_hosts``, required when listening off loopback), at most ``max_per_peer`` connections
per peer address and ``max_associations`` in all (counted per TCP connection, before any DICOM byte is
read, so a silent connection holds a slot too), and time limits: ``acse_timeout`` for a connection to
ask for an association, ``dimse_timeout`` for a message to complete, ``idle_timeout`` for an
association to stay silent. Refused connections and associations are logged with the reason.

A refused object gets a failure status (see :data:`STATUS_BY_REASON`) with a short ``ErrorComment`` and a
log line; the node keeps serving. For an accepted image two (or three) files appear in the output folder, each
written atomically (temporary file + ``os.replace``, the JSON last, so it marks a complete result), and
never over an earlier result (see :meth:`DicomNode._handle_store` for what a second object with the same
SOP Instance UID gets):

``<SOPInstanceUID>.json``
    the prediction as ``medclf predict`` gives it (the predicted class, the probabilities, a multi-label
    bundle's ``findings`` and ``positive``, an ordinal bundle's ``grade``, the operating point's
    ``decision``, the out-of-distribution flag, score and warning), the model's sha256, the source
    Study/Series/SOP Instance UIDs, the time. It holds **no patient identifiers** (no name, id, birth
    date): it is meant for logs, dashboards and audit, which must not become a second copy of the patient
    record.
``<SOPInstanceUID>.sr.dcm``
    a Comprehensive 3D SR (TID 1500 measurement report, built with highdicom by
    :func:`medclf.serve.sr.build_sr`: see there) with new SOP Instance and Series UIDs, referencing the
    source instance, holding one measurement group per class (its probability; the predicted class, or each
    finding present, "Present"), an ordinal bundle's grade (its code, index and expected index), the
    operating point's decision when the bundle has one, and the out-of-distribution check.
    For an input outside the training distribution the SR holds **no finding and no probabilities**, only
    the check saying the model gives no valid result for it. The SR **does** copy the Patient module
    (name, id, birth date, sex) and the General Study module from the source: a PACS files an SR by
    patient and study, and an SR without them would be orphaned or mismatched. It carries the same
    identifiers the source image already carried to the same archive, nothing more.
``<SOPInstanceUID>.fhir.json`` (``fhir=True``, ``medclf dicom-node --fhir``)
    the same result as a FHIR R4 ``DiagnosticReport`` (:mod:`medclf.serve.fhir`), identified by the SR's
    SOP Instance UID; like the JSON, it holds no patient identifiers.
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
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, evt, sop_class
from pynetdicom.transport import ThreadedAssociationServer

from medclf.errors import ConfigError, InputRejected
from medclf.io import ReadLimits, read_image
from medclf.predictor import Predictor, as_predictor, prediction_fields
from medclf.serve.sr import build_sr

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event, EventHandlerType

    from medclf.bundle import Bundle

# pynetdicom creates its SOP class constants at import time from a table (globals()), which no type checker
# sees: looked up untyped.
sop: Any = sop_class

__all__ = [
    "ACCEPTED_STORAGE",
    "DEFAULT_MODALITIES",
    "STATUS_BY_REASON",
    "DicomNode",
    "accepted_sop_classes",
    "build_sr",
    "decodable_transfer_syntaxes",
    "run_dicom_node",
    "storage_modalities",
]

log = logging.getLogger(__name__)

# Image storage SOP classes by modality (the Modality attribute's defined terms, PS3.3 C.7.3.1.1.1); the
# node accepts those of the modalities :func:`storage_modalities` picks for the bundle.
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
    "MG": (
        sop.DigitalMammographyXRayImageStorageForPresentation,
        sop.DigitalMammographyXRayImageStorageForProcessing,
        sop.BreastProjectionXRayImageStorageForPresentation,
        sop.BreastProjectionXRayImageStorageForProcessing,
        sop.BreastTomosynthesisImageStorage,
    ),
    "US": (
        sop.UltrasoundImageStorage,
        sop.UltrasoundMultiFrameImageStorage,
        sop.EnhancedUSVolumeStorage,
    ),
    "XA": (sop.XRayAngiographicImageStorage, sop.EnhancedXAImageStorage),
    "RF": (sop.XRayRadiofluoroscopicImageStorage, sop.EnhancedXRFImageStorage),
    "PT": (
        sop.PositronEmissionTomographyImageStorage,
        sop.EnhancedPETImageStorage,
        sop.LegacyConvertedEnhancedPETImageStorage,
    ),
    "NM": (sop.NuclearMedicineImageStorage,),
    "IO": (
        sop.DigitalIntraOralXRayImageStorageForPresentation,
        sop.DigitalIntraOralXRayImageStorageForProcessing,
    ),
    "XC": (sop.VLPhotographicImageStorage,),
    "ES": (sop.VLEndoscopicImageStorage,),
    "GM": (sop.VLMicroscopicImageStorage,),
    "OP": (sop.OphthalmicPhotography8BitImageStorage, sop.OphthalmicPhotography16BitImageStorage),
    "SC": (
        sop.SecondaryCaptureImageStorage,
        sop.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        sop.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        sop.MultiFrameTrueColorSecondaryCaptureImageStorage,
    ),
}
# Modalities accepted when the training data does not say (PNG, JPEG, TIFF, NIfTI, NPZ files carry no DICOM
# modality): the radiology modalities whose images a greyscale 2D or 3D model is commonly trained on,
# ultrasound and mammography included (a breast ultrasound model trained on PNGs must take US images).
# Colour models also take the visible-light photography classes. Accepting a modality the model never saw
# is not a silent risk: the reader refuses what the model cannot take (a volume for a 2D model) and the
# out-of-distribution guard flags the rest, in the JSON and the SR.
DEFAULT_MODALITIES = ("MR", "CT", "CR", "DX", "MG", "US", "XA", "RF", "PT", "NM", "IO")
COLOUR_MODALITIES = ("XC", "ES", "GM", "OP")
# Secondary Capture is always accepted: it is how viewers, converters and other AI tools send any image.
ALWAYS_ACCEPTED = ("SC",)
_MODALITY_ALIASES = {"OT": "SC"}  # "other": a Secondary Capture image as a rule

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
    # A second object under a SOP Instance UID already classified, with other content (another patient,
    # study or pixels). PS3.4's C-STORE statuses have no "duplicate"; A7xx/A9xx would misstate the cause.
    # A Cxxx failure tells the sender the object was not taken, which is true, and the ErrorComment says
    # why. (An identical re-send gets Success, as Orthanc answers: the instance is held.)
    "duplicate_uid": CANNOT_UNDERSTAND,
}


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


def storage_modalities(
    bundle: Bundle | Predictor, override: Iterable[str] | None = None
) -> tuple[list[str], str]:
    """The modalities whose image storage SOP classes the node accepts for ``bundle``, and why.

    ``override`` (``--accept-modality``) wins. Otherwise the training data's fingerprint decides
    (``data.fingerprint_stats.modalities`` in bundle.json): when every probed training file was DICOM of
    a modality in :data:`ACCEPTED_STORAGE`, those modalities; when some carried none (PNG, JPEG, NIfTI,
    NPZ, ...) or one this table does not know, :data:`DEFAULT_MODALITIES` as well (plus
    :data:`COLOUR_MODALITIES` for a colour model). Secondary Capture is always accepted.
    """
    if override:
        chosen = {_MODALITY_ALIASES.get(m.strip().upper(), m.strip().upper()) for m in override}
        unknown = sorted(chosen - set(ACCEPTED_STORAGE))
        if unknown:
            raise ConfigError(
                f"unknown modality {', '.join(unknown)}; choose from {', '.join(sorted(ACCEPTED_STORAGE))}"
            )
        return sorted(chosen | set(ALWAYS_ACCEPTED)), "chosen with --accept-modality"
    stats = (bundle.manifest.get("data") or {}).get("fingerprint_stats") or {}
    seen = {
        _MODALITY_ALIASES.get(str(m).upper(), str(m).upper())
        for m, n in (stats.get("modalities") or {}).items()
        if n
    }
    known = seen & set(ACCEPTED_STORAGE)
    chosen = set(known) | set(ALWAYS_ACCEPTED)
    if known and seen == known:
        why = f"the training data's modalities ({', '.join(sorted(known))})"
    else:
        chosen |= set(DEFAULT_MODALITIES)
        if bundle.spec.channels == 3 and not bundle.spec.slices_as_channels:
            chosen |= set(COLOUR_MODALITIES)
        formats = ", ".join(sorted((stats.get("formats") or {}).keys())) or "unknown"
        why = (
            f"a default set: the training data ({formats}) does not name its modality"
            if not known
            else f"the training data's modalities ({', '.join(sorted(known))}) and a default set for its "
            f"files without a known one"
        )
    return sorted(chosen), why


class _ConnectionGate:
    """Admission of TCP connections before any DICOM byte is read: the address allowlist, the per-peer and
    total caps. Connections, not associations, are counted: a peer that connects and stays silent holds a
    slot (until the ACSE timeout) just like one that keeps an association alive with C-ECHOs."""

    def __init__(self, networks: list[Any], max_total: int, max_per_peer: int) -> None:
        self.networks = networks
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self._open: list[tuple[str, socket.socket]] = []
        self._lock = threading.Lock()
        self._last_logged: dict[str, float] = {}

    def open_connections(self, host: str | None = None) -> int:
        with self._lock:
            self._prune()
            return sum(1 for h, _ in self._open if host is None or h == host)

    def _prune(self) -> None:
        # pynetdicom closes a connection's socket when its association ends, however it ends.
        self._open = [(h, s) for h, s in self._open if s.fileno() != -1]

    def admit(self, sock: socket.socket, address: Any) -> bool:
        host = _peer_host(address)
        refusal = None
        if self.networks and not _in_networks(host, self.networks):
            refusal = "its address is not in the allowed hosts (--allow-host)"
        else:
            with self._lock:
                self._prune()
                mine = sum(1 for h, _ in self._open if h == host)
                if mine >= self.max_per_peer:
                    refusal = f"it already holds {mine} connection(s), the limit per peer (--max-per-peer)"
                elif len(self._open) >= self.max_total:
                    refusal = f"{len(self._open)} connections are open, the limit (--max-associations)"
                else:
                    self._open.append((host, sock))
        if refusal is None:
            return True
        # One line per peer every 10 s at most: a peer hammering the port must not flood the log.
        now = time.monotonic()
        if now - self._last_logged.get(host, -1e9) >= 10.0:
            self._last_logged[host] = now
            log.warning("refused a connection from %s: %s", _lo(host), refusal)
        return False


class _GatedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, asking a :class:`_ConnectionGate` before it serves a connection."""

    def __init__(self, *args: Any, gate: _ConnectionGate, **kwargs: Any) -> None:
        self.gate = gate
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # socketserver closes a connection refused here; no thread, no association is created for it.
        return self.gate.admit(request, client_address)


class _NodeAE(AE):
    """An AE whose servers are :class:`_GatedServer`: the gate is in place before the first accept()."""

    def __init__(self, gate: _ConnectionGate) -> None:
        super().__init__()
        self._gate = gate

    def make_server(self, address: Any, *args: Any, server_class: Any = None, **kwargs: Any) -> Any:
        # pynetdicom passes everything after the address by keyword, so *args never holds a server_class.
        return super().make_server(address, *args, server_class=_GatedServer, gate=self._gate, **kwargs)  # type: ignore[misc]


class DicomNode:
    """A Storage SCP that classifies each received image with ``bundle`` and writes results to ``out_dir``.

    ``port=0`` picks a free port (see :attr:`port` once started). The model runs under a lock: the
    associations pynetdicom serves in parallel threads share one CPU-bound model. Access control and
    time limits: see the module docstring; ``allowed_hosts`` holds addresses or networks (``10.1.2.0/24``)
    and is required when ``host`` is not a loopback address (``0.0.0.0/0`` allows every IPv4 peer).
    ``modalities`` overrides the storage classes the training data calls for (:func:`storage_modalities`).
    ``fhir``: also write each result as a FHIR ``DiagnosticReport`` (``<SOPInstanceUID>.fhir.json``).
    One node per output folder: duplicates are detected within the node.
    """

    def __init__(
        self,
        bundle: Bundle | Predictor,
        out_dir: str | Path,
        *,
        ae_title: str = "MEDCLF",
        host: str = "127.0.0.1",
        port: int = 11112,
        limits: ReadLimits | None = None,
        max_associations: int = 8,
        max_per_peer: int = 2,
        allowed_aets: Sequence[str] = (),
        allowed_hosts: Sequence[str] = (),
        acse_timeout: float = 10.0,
        dimse_timeout: float = 30.0,
        idle_timeout: float = 30.0,
        modalities: Sequence[str] | None = None,
        fhir: bool = False,
    ) -> None:
        self.bundle = as_predictor(bundle)
        self.fhir = bool(fhir)
        self.out_dir = Path(out_dir)
        self.host = host
        self.requested_port = int(port)
        self.limits = limits or ReadLimits()
        self._predict_lock = threading.Lock()
        self._results_lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        for name, value in (("max_associations", max_associations), ("max_per_peer", max_per_peer)):
            if int(value) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, not {value}")
        for name, seconds in (
            ("acse_timeout", acse_timeout),
            ("dimse_timeout", dimse_timeout),
            ("idle_timeout", idle_timeout),
        ):
            if not float(seconds) > 0:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be a positive number of seconds, not {seconds}"
                )
        networks = [_network(h) for h in allowed_hosts]
        if not networks and not _is_loopback(host):
            raise ConfigError(
                f"listening on {host}, reachable from the network, needs --allow-host: the addresses or networks "
                "(e.g. 10.1.2.0/24) of the peers that may connect (0.0.0.0/0 allows any); DICOM itself has no "
                "passwords"
            )
        self.allowed_hosts = [str(n) for n in networks]
        self._gate = _ConnectionGate(networks, int(max_associations), int(max_per_peer))
        self._ae = _NodeAE(self._gate)
        try:
            self._ae.ae_title = ae_title
        except ValueError as exc:
            raise ConfigError(f"invalid AE title {ae_title!r}: {exc}") from None
        self.ae_title = str(self._ae.ae_title)
        self._ae.require_called_aet = True  # answer only associations addressed to this node
        try:
            self._ae.require_calling_aet = [str(a) for a in allowed_aets]
        except ValueError as exc:
            raise ConfigError(f"invalid calling AE title in --allow-aet: {exc}") from None
        self.allowed_aets = list(self._ae.require_calling_aet)
        self._ae.maximum_associations = int(max_associations)
        self._ae.acse_timeout = float(acse_timeout)
        self._ae.dimse_timeout = float(dimse_timeout)
        self._ae.network_timeout = float(idle_timeout)
        self.modalities, self.modalities_reason = storage_modalities(bundle, modalities)
        self.syntaxes = decodable_transfer_syntaxes()
        self._ae.add_supported_context(sop.Verification)
        for sop_class_uid in accepted_sop_classes(self.modalities):
            self._ae.add_supported_context(sop_class_uid, self.syntaxes)

    @property
    def port(self) -> int:
        """The port the node listens on (the real one when started with ``port=0``)."""
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    def open_connections(self, host: str | None = None) -> int:
        """Connections the node holds now (from ``host`` only, when given)."""
        return self._gate.open_connections(host)

    def start(self) -> DicomNode:
        """Start listening in background threads; returns ``self``."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_ACCEPTED, self._log_rejected_contexts),
            (evt.EVT_REJECTED, self._log_rejected_association),
        ]
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
        log.info("accepting images of %s: %s", ", ".join(self.modalities), self.modalities_reason)
        log.info(
            "peers: calling AE titles %s, hosts %s; at most %d connection(s) per peer, %d in all",
            ", ".join(self.allowed_aets) or "any",
            ", ".join(self.allowed_hosts) or "any (loopback only)",
            self._gate.max_per_peer,
            self._gate.max_total,
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

    def _log_rejected_association(self, event: Event) -> None:
        requestor = event.assoc.requestor
        reply = event.assoc.acceptor.primitive
        diagnosis: tuple[Any, Any]
        diagnosis = (getattr(reply, "result_source", None), getattr(reply, "diagnostic", None))
        called = _lo(str(getattr(requestor.primitive, "called_ae_title", "") or "").strip())
        reason = {
            (0x01, 0x03): "its calling AE title is not in the allowed ones (--allow-aet)",
            (0x01, 0x07): f"it called AE title {called!r}, not this node's {self.ae_title!r}",
            (0x03, 0x02): "too many associations are open (--max-associations)",
            (0x02, 0x01): "its user identity was not accepted",
        }.get(diagnosis, f"A-ASSOCIATE-RJ source {diagnosis[0]}, reason {diagnosis[1]}")
        log.warning(
            "rejected an association from %s at %s: %s",
            _calling_ae(event),
            _lo(str(requestor.address)),
            reason,
        )

    def _log_rejected_contexts(self, event: Event) -> None:
        """Log every presentation context the node did not accept, with the reason: one line per reason,
        naming the SOP classes (dcmtk's storescu proposes ~120 at once). A warning when the peer can send
        no image at all (nothing but Verification accepted) or an image class failed on its transfer
        syntaxes, else information: a sender proposing every class it knows is no problem."""
        rejected = event.assoc.rejected_contexts
        if not rejected:
            return
        proposed = {
            cx.context_id: cx
            for cx in getattr(event.assoc.requestor.primitive, "presentation_context_definition_list", None)
            or []
        }
        groups: dict[str, list[str]] = {}
        for cx in rejected:
            name = _lo(UID(str(cx.abstract_syntax)).name)
            if cx.result == 0x03:
                modality = next((m for m, c in ACCEPTED_STORAGE.items() if cx.abstract_syntax in c), None)
                if modality:
                    why = (
                        f"abstract syntax not supported: modality {modality} is not among those accepted "
                        f"({', '.join(self.modalities)}; {self.modalities_reason}; --accept-modality adds one)"
                    )
                else:
                    why = "abstract syntax not supported: not an image storage SOP class this node classifies"
            elif cx.result == 0x04:
                offered = proposed.get(cx.context_id)
                names = sorted({_lo(UID(str(t)).name) for t in (offered.transfer_syntax if offered else [])})
                why = (
                    f"transfer syntax not supported: none of {', '.join(names) or 'the proposed ones'} can be "
                    "decoded here"
                )
            else:
                why = {0x01: "rejected by the user", 0x02: "no reason given"}.get(
                    cx.result,  # type: ignore[arg-type]  # dict.get takes any key; typeshed wants an int
                    f"result {cx.result}",
                )
            groups.setdefault(why, [])
            if name not in groups[why]:
                groups[why].append(name)
        no_image = not any(cx.abstract_syntax != sop.Verification for cx in event.assoc.accepted_contexts)
        for why, names in groups.items():
            serious = no_image or why.startswith("transfer syntax")
            log.log(
                logging.WARNING if serious else logging.INFO,
                "rejected presentation context(s) from %s at %s: %s: %s",
                _calling_ae(event),
                _lo(str(event.assoc.requestor.address)),
                why,
                ", ".join(names),
            )

    def _handle_store(self, event: Event) -> Dataset:
        """Classify one C-STORE. A SOP Instance UID already classified is never classified again and its
        result never overwritten: an identical copy (same patient, study, series and decoded pixels, in
        any transfer syntax: a retry, a re-forward) gets Success, as Orthanc answers; another object under
        that UID gets a failure (``duplicate_uid``) and a log line. The first result stands either way."""
        started = time.perf_counter()
        calling = _calling_ae(event)
        request = cast("C_STORE", event.request)  # the handler of C-STORE requests
        uid = _lo(str(request.AffectedSOPInstanceUID or ""))  # printable only: it goes to the log
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
        if result.get("duplicate"):
            log.info(
                "%s from %s: already classified, an identical copy; the first result is kept", uid, calling
            )
            return _status(SUCCESS)
        log.info(
            "classified %s from %s as %s (p=%.3f) in %.0f ms",
            uid,
            calling,
            result["predicted"],
            result["confidence"],
            result["latency_ms"],
        )
        if result.get("ood"):
            log.warning("%s from %s: %s", uid, calling, result.get("warning", "out of distribution"))
        return _status(SUCCESS)

    def _classify_and_write(self, event: Event, calling: str, started: float) -> dict[str, Any]:
        request = cast("C_STORE", event.request)  # the handler of C-STORE requests
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
        content = _content_sha256(header, image.pixels)
        json_path = self.out_dir / f"{source.instance}.json"
        if (earlier := _earlier_result(json_path)) is not None:  # before the model runs: it is not needed
            return _duplicate(earlier, content, source.instance)
        with self._predict_lock:
            (prediction,) = self.bundle.predict([image])
        if "error" in prediction:
            raise InputRejected(prediction["error"], reason=prediction.get("reason", "invalid"))
        now = dt.datetime.now(dt.UTC)
        sr = build_sr(header, prediction, self.bundle, now=now, observer_name=self.ae_title)
        result: dict[str, Any] = {
            "sop_instance_uid": source.instance,
            "series_instance_uid": source.series,
            "study_instance_uid": source.study,
            "sop_class_uid": source.sop_class,
            "modality": source.modality,
            # Every field of `medclf predict`'s answer (findings, grade, decision, OOD check...), by the
            # same function as the HTTP API, so that no output drops one.
            **prediction_fields(prediction),
            "model": {"sha256": self.bundle.sha256, "arch": self.bundle.arch, "classes": self.bundle.classes},
            "received_at": now.isoformat(timespec="milliseconds"),
            "calling_ae": calling,
            "transfer_syntax": str(event.context.transfer_syntax),
            # One-way: tells a re-sent copy of this instance from another object under the same UID.
            "content_sha256": content,
            "sr": {
                "file": f"{source.instance}.sr.dcm",
                "sop_instance_uid": str(sr.SOPInstanceUID),
                "series_instance_uid": str(sr.SeriesInstanceUID),
            },
        }
        report = None
        if self.fhir:
            from medclf.serve.fhir import diagnostic_report, report_json

            sr_uid = {"system": "urn:dicom:uid", "value": f"urn:oid:{sr.SOPInstanceUID}"}
            report = report_json(diagnostic_report(prediction, self.bundle, issued=now, identifiers=[sr_uid]))
            result["fhir"] = {"file": f"{source.instance}.fhir.json"}
        with self._results_lock:  # two associations may deliver the same UID at the same time
            if (earlier := _earlier_result(json_path)) is not None:
                return _duplicate(earlier, content, source.instance)
            _write_atomic(
                self.out_dir / f"{source.instance}.sr.dcm",
                lambda fh: dcmwrite(fh, sr, enforce_file_format=True),
            )
            if report is not None:
                data = report.encode("utf-8")
                _write_atomic(self.out_dir / f"{source.instance}.fhir.json", lambda fh: fh.write(data))
            result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
            text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
            _write_atomic(json_path, lambda fh: fh.write(text.encode("utf-8")))
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


def _content_sha256(header: Dataset, pixels: Any) -> str:
    """sha256 of an instance's identity (class, patient, study, series) and decoded pixels: the same for a
    copy in another (lossless) transfer syntax, different for another object. Not reversible, and unique
    to one image, so it links nothing across images."""
    h = hashlib.sha256()
    for keyword in ("SOPClassUID", "PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID"):
        h.update(f"{keyword}={header.get(keyword, '')}\n".encode("utf-8", "replace"))
    h.update(f"SeriesInstanceUID={header.get('SeriesInstanceUID', '')}\n".encode("utf-8", "replace"))
    h.update(f"{pixels.dtype.str}{pixels.shape}".encode())
    h.update(pixels.tobytes())
    return h.hexdigest()


def _earlier_result(json_path: Path) -> dict[str, Any] | None:
    """The result already written for this UID, ``{}`` when its JSON cannot be read, None when none."""
    try:
        text = json_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        earlier = json.loads(text)
    except ValueError:
        return {}
    return earlier if isinstance(earlier, dict) else {}


def _duplicate(earlier: dict[str, Any], content: str, instance: str) -> dict[str, Any]:
    if earlier.get("content_sha256") == content:
        return {"duplicate": True, "sop_instance_uid": instance}
    raise InputRejected(
        f"SOP Instance UID {instance} was already received with other content (patient, study, series or "
        "pixels); the first result is kept",
        reason="duplicate_uid",
    )


def run_dicom_node(
    bundle: str | Path,
    out: str | Path,
    *,
    port: int = 11112,
    ae_title: str = "MEDCLF",
    host: str = "127.0.0.1",
    trusted_keys: str | Path | None = None,
    bundle_sha256: str | None = None,
    **node_options: Any,
) -> None:
    """Load (and verify) ``bundle``, then serve until interrupted: what ``medclf dicom-node`` runs.

    ``node_options``: the other keyword arguments of :class:`DicomNode` (access control, time limits,
    modalities); ``trusted_keys`` / ``bundle_sha256``: see :func:`medclf.bundle.load_bundle`."""
    from medclf.engines import tune_allocator

    tune_allocator()
    loaded = Predictor.load(bundle, trusted_keys=trusted_keys, expected_sha256=bundle_sha256)
    node = DicomNode(loaded, out, ae_title=ae_title, host=host, port=port, **node_options)
    node.serve_forever()


# -- small helpers -----------------------------------------------------------------------------------------


def _lo(text: str) -> str:
    """A value fit for a Long String: at most 64 characters, no backslash or control characters."""
    clean = "".join(c if c.isprintable() and c != "\\" else " " for c in text)
    return clean[:64]


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


def accepted_sop_classes(modalities: Iterable[str] | None = None) -> Iterable[str]:
    """The storage SOP Class UIDs of ``modalities`` (default: of every modality in the table)."""
    for modality in ACCEPTED_STORAGE if modalities is None else modalities:
        yield from ACCEPTED_STORAGE[modality]


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ConfigError(
            f"--allow-host {text!r} is not an IP address or network (such as 10.1.2.3 or 10.1.2.0/24)"
        ) from None


def _peer_host(address: Any) -> str:
    """The peer's IP address as text; an IPv4 peer seen through an IPv6 socket as its IPv4 address."""
    host = str(address[0] if isinstance(address, tuple) else address)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _in_networks(host: str, networks: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in networks)
