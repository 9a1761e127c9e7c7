"""De-identification of DICOM files: the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

``medclf deid IN OUT`` (and :func:`deidentify`) writes a de-identified copy of a DICOM file or of every
DICOM file in a folder. What it does, following PS3.15 (2023) Table E.1-1, Basic Profile column:

* Every attribute of :data:`BASIC_PROFILE` gets its action, in the data set and in every nested sequence
  item: ``X`` removes it, ``Z`` empties it, ``D`` replaces it with a dummy value of its VR, ``U`` replaces
  a UID with a new one. Where the standard leaves a choice that depends on the attribute's type in the
  IOD (``Z/D``, ``X/Z``, ``X/D``, ``X/Z/D``), medclf takes the one valid for every type: ``D`` when D is
  allowed, else ``Z``; ``X/Z/U*`` sequences are kept and the UIDs inside them remapped. Sequences that
  must be emptied or replaced (``Z``, ``D``) become empty sequences. PatientName and PatientID (``Z``)
  get the same dummy pseudonym, ``ANON-`` + 12 hex digits of HMAC-SHA256(salt, PatientID), so that the
  files of one patient stay grouped (patient-level splits need it) while the identity is gone.
* All private attributes are removed, and so are curves (groups 50xx) and overlays (groups 60xx), which
  can carry burned-in text.
* UIDs are remapped consistently: the new UID is ``2.25.`` followed by the decimal value of the first
  128 bits of HMAC-SHA256(salt, original UID), so every file of a study, series or frame of reference
  keeps pointing at the same (new) UIDs, within one run and across runs that share the salt.
* PatientIdentityRemoved (0012,0062) = ``YES``, DeidentificationMethod (0012,0063) names this profile,
  DeidentificationMethodCodeSequence (0012,0064) holds ``(113100, DCM, "Basic Application
  Confidentiality Profile")``, and LongitudinalTemporalInformationModified (0028,0303) = ``REMOVED``.
* Images with BurnedInAnnotation = ``YES`` may show identity in their pixels, which no header edit can
  remove: they are refused and listed, unless ``allow_burned_in`` (then written and still listed).
* The 128-byte preamble is always written as zeros, which neutralises a preamble holding an executable
  (CVE-2019-11687). The file meta is rebuilt (no source or sending AE titles, no private information).

Not done (options of the standard beyond the Basic Profile): cleaning free text of attributes the profile
keeps, the "Retain ..." options, and pixel-level removal of burned-in text. File and folder names are kept,
except that a file whose relative path contains the PatientID, a part of the PatientName or the birth date
is written as ``OUT/<new SOPInstanceUID>.dcm`` instead (an output file named explicitly is kept).

Files are written atomically (a temporary file in the target folder, fsync, rename); the input is never
overwritten: OUT may not be IN, inside IN or contain IN, and an existing output that is the same file as an
input is refused. Non-DICOM files (decided by content, as everywhere in medclf) are listed as skipped.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence

from medclf.errors import ConfigError, InputRejected, MedclfError
from medclf.io.guard import ReadLimits, check_file, executable_preamble, library_errors, sniff

#: Environment variable holding the secret salt (any text) when no salt file is given.
SALT_ENV = "MEDCLF_DEID_SALT"
METHOD = "medclf deid: PS3.15 Basic Application Confidentiality Profile"  # LO: 64 characters at most
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

# Action code -> keywords (pydicom's), PS3.15 2023 Table E.1-1, Basic Profile column.
BASIC_PROFILE: dict[str, str] = {
    "D": """AcquisitionFieldOfViewLabel AnnotationGroupLabel AnnotationGroupUID AssertionDateTime
AttributeModificationDateTime BeamHoldTransitionDateTime CertificateOfSigner ClinicalTrialProtocolEthicsCommitteeName
ClinicalTrialProtocolID ClinicalTrialSponsorName ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ContainerIdentifier
ContentSequence ContextGroupLocalVersion ContextGroupVersion Date DateTime DecayCorrectionDateTime DestinationAE DeviceLabel
DigitalSignatureDateTime EffectiveDateTime EncapsulatedDocument EntityLabel EntityLongLabel ExclusionStartDateTime
FlowIdentifier FlowIdentifierSequence FrameAcquisitionDateTime FrameOriginTimestamp FrameReferenceDateTime
FunctionalSyncPulse GraphicAnnotationSequence HangingProtocolCreationDateTime ImpedanceMeasurementDateTime
InformationIssueDateTime InterlockDateTime InterlockDescription InterlockOriginDescription ModifyingSystem OverrideDateTime
PersonIdentificationCodeSequence PersonName RTPlanLabel RTPrescriptionLabel RTToleranceSetLabel RadiationDoseIdentificationLabel
RadiationDoseInVivoMeasurementLabel RadiationGenerationModeLabel ReasonForTheAttributeModification RecordedRTControlPointDateTime
ReferencedDateTime SafePositionExitDate SafePositionExitTime SafePositionReturnDate SafePositionReturnTime SelectorAEValue
SelectorASValue SelectorDAValue SelectorDTValue SelectorLOValue SelectorLTValue SelectorOBValue SelectorPNValue SelectorSHValue
SelectorSTValue SelectorTMValue SelectorUNValue SelectorURValue SelectorUTValue SourceEndDateTime SourceIdentifier
SourceStartDateTime SourceStrengthReferenceDate SourceStrengthReferenceTime SpecimenIdentifier StructureSetLabel Time
TreatmentControlPointDate TreatmentControlPointTime TreatmentPositionGroupLabel TreatmentToleranceViolationDateTime
TreatmentToleranceViolationDescription UserContentLabel UserContentLongLabel VerificationDateTime VerifyingObserverName
VerifyingObserverSequence VerifyingOrganization XRayDetectorID XRaySourceID""",
    "Z": """AccessionNumber CalibrationDateTime ClinicalTrialCoordinatingCenterName ClinicalTrialProtocolName ClinicalTrialSiteID
ClinicalTrialSiteName ClinicalTrialTimePointID ConceptualVolumeCombinationDescription ConceptualVolumeDescription
ConsultingPhysicianName DeviceAlternateIdentifier FillerOrderNumberImagingServiceRequest FractionationNotes
IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence ManufacturerDeviceIdentifier ParticipationDateTime
PatientID PatientBirthDate PatientName PatientSex PlacerOrderNumberImagingServiceRequest PrescriptionNotes
PrescriptionNotesSequence ROIInterpreter ROIName RTAccessoryDeviceSlotID RTAccessoryHolderSlotID RTPhysicianIntentNarrative
RadiationGenerationModeDescription ReasonForSuperseding ReferringPhysicianName ReviewDate ReviewTime SourceOfPreviousValues
SpecimenPreparationSequence StructureSetDate StructureSetTime StudyDate StudyID StudyTime TreatmentTechniqueNotes
VerifyingObserverIdentificationCodeSequence""",
    "X": """AcquisitionComments AcquisitionProtocolDescription ActualHumanPerformersSequence AdditionalPatientHistory AddressTrial
AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime AffectedSOPInstanceUID
Allergies AnnotationGroupDescription ApprovalStatusDateTime Arbitrary AssertionExpirationDateTime AuthorObserverSequence
BeamDescription BolusDescription BranchOfService CalibrationDate CalibrationTime CameraOwnerName CassetteID CertifiedTimestamp
ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialSeriesDescription ClinicalTrialSeriesID
ClinicalTrialTimePointDescription CommentsOnRadiationDose CommentsOnThePerformedProcedureStep CompensatorDescription
ConfidentialityConstraintOnPatientDataDescription ConsultingPhysicianIdentificationSequence ContainerComponentID
ContainerDescription ContentCreatorIdentificationCodeSequence ContrastBolusStartTime ContrastBolusStopTime
ContributionDateTime ContributionDescription CountryOfResidence CreationDate CreationTime CurrentObserverTrial
CurrentPatientLocation CurveDate CurveTime CustodialOrganizationSequence DataSetTrailingPadding
DateOfDocumentOrVerbalTransactionTrial DateOfInstallation DateOfLastCalibration DateOfManufacture DateOfSecondaryCapture
DateTimeOfLastCalibration DecompositionDescription DerivationDescription DeviceDescription DeviceSettingDescription
DigitalSignaturesSequence DischargeDate DischargeDiagnosisDescription DischargeTime DisplacementReferenceLabel
DistributionAddress DistributionName DoseReferenceDescription EntityDescription EntityName
EquipmentFrameOfReferenceDescription EthicsCommitteeApprovalEffectivenessEndDate EthicsCommitteeApprovalEffectivenessStartDate
EthnicGroup ExpectedCompletionDateTime FilterLookupTableDescription FindingsGroupRecordingDateTrial FindingsGroupRecordingTimeTrial
FixationDeviceDescription FractionGroupDescription FrameComments GPSAltitude GPSAltitudeRef GPSAreaInformation GPSDOP
GPSDateStamp GPSDestBearing GPSDestDistance GPSDestDistanceRef GPSDestLongitude GPSDestLongitudeRef GPSDestBearingRef
GPSDestLatitude GPSDestLatitudeRef GPSDifferential GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef GPSLongitude
GPSLongitudeRef GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites GPSSpeed GPSSpeedRef GPSStatus GPSTimeStamp
GPSTrack GPSTrackRef GPSVersionID GantryID GeneratorID HL7DocumentEffectiveTime HumanPerformerName
HumanPerformerOrganization IconImageSequence IdentifyingComments ImageComments ImagePresentationComments
ImagingServiceRequestComments Impressions InstanceCoercionDateTime InstanceOriginStatus InstitutionAddress
InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence InsurancePlanIdentification IntendedFractionStartTime
IntendedRecipientsOfResultsIdentificationSequence InterpretationApprovalDate InterpretationApprovalTime
InterpretationApproverSequence InterpretationAuthor InterpretationDiagnosisDescription InterpretationID InterpretationIDIssuer
InterpretationRecordedDate InterpretationRecordedTime InterpretationRecorder InterpretationText InterpretationTranscriber
InterpretationTranscriptionDate InterpretationTranscriptionTime InterventionDrugStartTime InterventionDrugStopTime
IssueDateOfImagingServiceRequest IssueTimeOfImagingServiceRequest IssuerOfAdmissionID IssuerOfAdmissionIDSequence
IssuerOfPatientID IssuerOfServiceEpisodeID IssuerOfServiceEpisodeIDSequence LastMenstrualDate LensMake LensModel
LensSerialNumber LensSpecification LongDeviceDescription MAC MakerNote MedicalAlerts MedicalRecordLocator MilitaryRank
ModifiedAttributesSequence ModifiedImageDate ModifiedImageDescription ModifiedImageTime ModifyingDeviceID
MultienergyAcquisitionDescription NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults NetworkID
NonconformingDataElementValue NonconformingModifiedAttributesSequence ObservationDateTrial ObservationStartDateTime
ObservationTimeTrial Occupation OrderCallbackPhoneNumber OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation
OriginalAttributesSequence Originator OtherPatientIDs OtherPatientIDsSequence OtherPatientNames OverlayDate OverlayTime
ParticipantSequence PatientComments PatientSetupPhotoDescription PatientState PatientTransportArrangements
PatientTreatmentPreparationMethodDescription PatientTreatmentPreparationProcedureParameterDescription PatientAddress PatientAge
PatientBirthName PatientBirthTime PatientInstitutionResidence PatientInsurancePlanCodeSequence PatientMotherBirthName
PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference PatientSize
PatientTelecomInformation PatientTelephoneNumbers PatientWeight PerformedLocation PerformedProcedureStepDescription
PerformedProcedureStepEndDate PerformedProcedureStepEndDateTime PerformedProcedureStepEndTime PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime PerformedStationAETitle
PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress PersonTelecomInformation PersonTelephoneNumbers
PhysicianApprovingInterpretation PhysiciansReadingStudyIdentificationSequence PhysiciansOfRecord
PhysiciansOfRecordIdentificationSequence PlateID PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName
PreMedication PregnancyStatus PrescriptionDescription PresentationCreationDate PresentationCreationTime
PriorTreatmentDoseDescription ProcedureStepCancellationDateTime ProductExpirationDateTime PyramidDescription PyramidLabel
ROIDescription ROIGenerationDescription ROIObservationDescription ROIObservationLabel RTPlanDescription RTPlanName
RadiopharmaceuticalStartDateTime RadiopharmaceuticalStartTime RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime
ReasonForOmissionDescription ReasonForRequestedProcedureCodeSequence ReasonForStudy ReasonForVisit ReasonForVisitCodeSequence
ReasonForTheImagingServiceRequest ReasonForTheRequestedProcedure ReceivingAE ReferencedDigitalSignatureSequence
ReferencedPatientAliasSequence ReferencedPatientPhotoSequence ReferencedPatientSequence ReferencedSOPInstanceMACSequence
ReferringPhysicianIdentificationSequence ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers RegionOfResidence
RequestAttributesSequence RequestedContrastAgent RequestedProcedureComments RequestedProcedureID RequestedProcedureLocation
RequestedSeriesDescription RequestingAE RequestingPhysician RequestingService RespiratoryMotionCompensationTechniqueDescription
ResponsibleOrganization ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsID ResultsIDIssuer
RetrieveAETitle SOPAuthorizationDateTime ScheduledAdmissionDate ScheduledAdmissionTime ScheduledDischargeDate
ScheduledDischargeTime ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName ScheduledProcedureStepDescription
ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepID
ScheduledProcedureStepLocation ScheduledProcedureStepModificationDateTime ScheduledProcedureStepStartDate
ScheduledProcedureStepStartDateTime ScheduledProcedureStepStartTime ScheduledStationAETitle
ScheduledStationGeographicLocationCodeSequence ScheduledStationName ScheduledStationNameCodeSequence ScheduledStudyLocation
ScheduledStudyLocationAETitle ScheduledStudyStartDate ScheduledStudyStartTime ScheduledStudyStopDate ScheduledStudyStopTime
SeriesDescription ServiceEpisodeDescription ServiceEpisodeID SetupTechniqueDescription ShieldingDeviceDescription
SlideIdentifier SmokingStatus SourceManufacturer SpecialNeeds SpecimenAccessionNumber SpecimenDetailedDescription
SpecimenShortDescription StationAETitle StructureSetDescription StructureSetName StudyArrivalDate StudyArrivalTime
StudyComments StudyCompletionDate StudyCompletionTime StudyDescription StudyIDIssuer StudyReadDate StudyReadTime
StudyVerifiedDate StudyVerifiedTime SubstanceAdministrationDateTime TelephoneNumberTrial TemplateLocalVersion TemplateVersion
TextComments TextString TimeOfDocumentCreationOrVerbalTransactionTrial TimeOfLastCalibration TimeOfSecondaryCapture
TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle TransducerIdentificationSequence TreatmentSites
UDISequence UniqueDeviceIdentifier VerbalSourceTrial VerbalSourceIdentifierCodeSequenceTrial VisitComments
XRayDetectorLabel WaveformFilterDescription""",
    "U": """AcquisitionUID ConcatenationUID ConceptualVolumeUID ConstituentConceptualVolumeUID DeviceUID DigitalSignatureUID
DimensionOrganizationUID DoseReferenceUID DosimetricObjectiveUID FailedSOPInstanceUIDList FiducialUID FrameOfReferenceUID
InstanceCreatorUID IrradiationEventUID LargePaletteColorLookupTableUID ManufacturerDeviceClassUID MediaStorageSOPInstanceUID
MultiplexGroupUID ObservationSubjectUIDTrial ObservationUID PaletteColorLookupTableUID PatientSetupUID
PresentationDisplayCollectionUID PresentationSequenceCollectionUID PyramidUID RTTreatmentPhaseUID
ReferencedConceptualVolumeUID ReferencedDoseReferenceUID ReferencedDosimetricObjectiveUID ReferencedFiducialsUID
ReferencedFrameOfReferenceUID ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedObservationUIDTrial
ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedTreatmentPositionGroupUID RelatedFrameOfReferenceUID
RequestedSOPInstanceUID SOPInstanceUID SeriesInstanceUID SourceConceptualVolumeUID SourceFrameOfReferenceUID SpecimenUID
StorageMediaFileSetUID StudyInstanceUID SynchronizationFrameOfReferenceUID TargetUID TemplateExtensionCreatorUID
TemplateExtensionOrganizationUID TrackingUID TransactionUID TreatmentPositionGroupUID TreatmentSessionUID UID""",
    "Z/D": """ContentCreatorName ContentDate ContentTime ContrastBolusAgent InstructionPerformedDateTime""",
    "X/Z": """AcquisitionContextSequence AcquisitionDate AcquisitionTime BarcodeValue LabelText PatientSexNeutered
ReferencedStudySequence RequestedProcedureDescription ReviewerName SourceSerialNumber TreatmentMachineName""",
    "X/D": """AcquisitionDeviceProcessingDescription DateOfLastDetectorCalibration DetectorID EndAcquisitionDateTime
FirstTreatmentDate InstanceCreationDate IntendedPhaseEndDate IntendedPhaseStartDate MostRecentTreatmentDate
ObservationDateTime OperatorIdentificationSequence ProtocolName RTPlanDate RTPlanTime RTTreatmentApproachLabel SeriesDate
SeriesTime StartAcquisitionDateTime TimeOfLastDetectorCalibration TreatmentDate TreatmentSite TreatmentTime""",
    "X/Z/D": """AcquisitionDateTime DeviceSerialNumber InstanceCreationTime InstitutionCodeSequence InstitutionName
OperatorsName ReferencedPerformedProcedureStepSequence StationName""",
    "X/Z/U*": """ReferencedImageSequence SourceImageSequence""",
}

# Dummy values for D, by VR (any value of the right form that identifies nobody).
_DUMMY_TEXT = {
    "PN": "ANONYMOUS",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "UR": "",
}
_TEXT_VRS = {"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"}
_NUMBER_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}


def _resolve(action: str) -> str:
    """The one action medclf applies for a (possibly compound) action code of the table."""
    if action == "X/Z/U*":
        return "U*"  # keep the sequence, remap the UIDs in it
    options = set(action.split("/"))
    if options == {"X"}:
        return "X"
    if "D" in options:
        return "D"  # valid whatever the attribute's type (1, 2 or 3)
    if "Z" in options:
        return "Z"  # valid for types 2 and 3
    return action  # "U", "K"


def _build_actions() -> dict[int, str]:
    actions: dict[int, str] = {}
    for action, keywords in BASIC_PROFILE.items():
        for keyword in keywords.split():
            tag = tag_for_keyword(keyword)
            if tag is None:  # pragma: no cover - guarded by a test over the whole table
                raise KeyError(f"unknown DICOM keyword in the profile table: {keyword}")
            actions[int(tag)] = _resolve(action)
    return actions


_ACTIONS = _build_actions()


@dataclass
class DeidReport:
    """What :func:`deidentify` did: one entry per input file, and the notes worth telling."""

    written: list[tuple[str, str]] = field(default_factory=list)  # (input, output)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, why): not DICOM
    refused: list[tuple[str, str]] = field(default_factory=list)  # (input, why): DICOM not written
    flagged: list[str] = field(default_factory=list)  # inputs with burned-in annotation (written or not)
    renamed: list[str] = field(default_factory=list)  # inputs whose name held identity
    neutralised_preambles: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": [{"input": i, "output": o} for i, o in self.written],
            "skipped": [{"input": i, "reason": r} for i, r in self.skipped],
            "refused": [{"input": i, "reason": r} for i, r in self.refused],
            "burned_in_annotation": self.flagged,
            "renamed": self.renamed,
            "neutralised_preambles": self.neutralised_preambles,
        }


class _Remapper:
    """Keyed, deterministic replacements: UIDs and the patient pseudonym."""

    def __init__(self, salt: bytes) -> None:
        self._salt = salt

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._salt, f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        value = str(value).strip()
        if not value:
            return value
        return "2.25." + str(int.from_bytes(self._digest("uid", value)[:16], "big"))

    def pseudonym(self, patient_id: str) -> str:
        return "ANON-" + self._digest("patient", str(patient_id).strip()).hex()[:12].upper()


def _dummy(elem: pydicom.DataElement) -> Any:
    vr = str(elem.VR)
    if vr in _DUMMY_TEXT:
        return _DUMMY_TEXT[vr]
    if vr in _TEXT_VRS:
        return "ANONYMIZED"
    if vr in _NUMBER_VRS or " or " in vr:  # "US or SS" and the like
        return 0
    if vr == "SQ":
        return DicomSequence([])
    return b""  # OB, OW, UN, ...: empty


def _empty(elem: pydicom.DataElement) -> Any:
    return (
        DicomSequence([]) if elem.VR == "SQ" else (b"" if elem.VR in ("OB", "OW", "OF", "OD", "UN") else "")
    )


def _apply_profile(ds: Dataset, remap: _Remapper, pseudonym: str | None) -> None:
    """Apply the Basic Profile to ``ds`` and, recursively, to every item of every sequence in it."""
    for elem in list(ds):
        tag = int(elem.tag)
        group = tag >> 16
        if elem.tag.is_private or (group & 0xFF00) in (0x5000, 0x6000):
            del ds[elem.tag]  # private attributes, curves, overlays
            continue
        action = _ACTIONS.get(tag)
        if action == "X":
            del ds[elem.tag]
        elif action in ("Z", "D"):
            if elem.keyword in ("PatientName", "PatientID") and pseudonym:
                elem.value = pseudonym  # a dummy value, the same one for all files of the patient
            else:
                elem.value = _dummy(elem) if action == "D" else _empty(elem)
        elif action == "U":
            if elem.VM > 1:
                elem.value = [remap.uid(v) for v in elem.value]
            elif elem.value:
                elem.value = remap.uid(elem.value)
        if elem.tag in ds and elem.VR == "SQ":
            for item in elem.value or []:
                _apply_profile(item, remap, pseudonym)


def _identity_strings(ds: Dataset) -> list[str]:
    """Identifying values that must not appear in output file names."""
    out = []
    for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber"):
        value = str(ds.get(keyword, "") or "").strip()
        if len(value) >= 3:
            out.append(value)
    name = ds.get("PatientName")
    if name:
        for part in str(name).replace("^", " ").replace("=", " ").split():
            if len(part) >= 3:
                out.append(part)
    return out


def deidentify_dataset(ds: Dataset, remap: _Remapper) -> Dataset:
    """Apply the profile to a data set in place (see the module docstring) and return it."""
    pseudonym = remap.pseudonym(str(ds.PatientID)) if str(ds.get("PatientID", "") or "").strip() else None
    _apply_profile(ds, remap, pseudonym)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = DicomSequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    return ds


def _new_file_meta(ds: Dataset, old: FileMetaDataset | None, transfer_syntax: Any) -> FileMetaDataset:
    meta = FileMetaDataset()
    sop_class = ds.get("SOPClassUID") or (old.get("MediaStorageSOPClassUID") if old is not None else None)
    if sop_class:
        meta.MediaStorageSOPClassUID = sop_class
    if ds.get("SOPInstanceUID"):
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _write_atomic(ds: Dataset, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_salt(salt_file: str | Path | None) -> tuple[bytes, bool]:
    """(salt, persistent?): from the file, else $MEDCLF_DEID_SALT, else random for this run only."""
    if salt_file is not None:
        try:
            salt = Path(salt_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{salt_file}: cannot read the salt file ({exc.strerror or exc})") from None
        if len(salt) < 16:
            raise ConfigError(f"{salt_file}: the salt must hold at least 16 bytes of secret")
        return salt, True
    env = os.environ.get(SALT_ENV, "").encode()
    if env:
        if len(env) < 16:
            raise ConfigError(f"${SALT_ENV} must hold at least 16 characters of secret")
        return env, True
    return secrets.token_bytes(32), False


def _inputs(src: Path) -> list[tuple[Path, Path]]:
    """(file, path relative to IN's folder) for a file or every non-hidden file under a folder."""
    if src.is_dir():
        return [
            (f, f.relative_to(src))
            for f in sorted(src.rglob("*"))
            if not f.is_dir() and not any(part.startswith(".") for part in f.relative_to(src).parts)
        ]
    return [(src, Path(src.name))]


def _check_paths(src: Path, out: Path) -> None:
    if not src.exists() and not src.is_symlink():
        raise InputRejected("no such file or folder", reason="not_found", path=str(src))
    a, b = src.resolve(), out.resolve()
    if a == b or (src.is_dir() and (b.is_relative_to(a) or a.is_relative_to(b))):
        raise ConfigError(
            f"the output {out} must not be the input {src}, lie inside it or contain it: deid never writes "
            "over or beside its input"
        )


def deidentify(
    src: str | Path,
    out: str | Path,
    *,
    salt_file: str | Path | None = None,
    allow_burned_in: bool = False,
    limits: ReadLimits | None = None,
    log: Callable[[str], None] | None = None,
) -> DeidReport:
    """De-identify a DICOM file or every DICOM file under a folder into ``out`` (see the module docstring).

    For a folder, ``out`` is a folder that mirrors it. For a file, ``out`` is the output file, or a folder
    (existing, or named with a trailing ``/``) to write it into. A single input that is not DICOM raises
    :class:`~medclf.errors.InputRejected`; in a folder, such files are listed in ``report.skipped``.
    ``salt_file`` (or ``$MEDCLF_DEID_SALT``) keeps the UID mapping the same across runs; without it a
    random salt makes UIDs consistent within this run only. ``log`` receives one line per notable event.
    """
    limits = limits or ReadLimits()
    src_path, out_path = Path(src), Path(out)
    _check_paths(src_path, out_path)
    salt, persistent = _load_salt(salt_file)
    remap = _Remapper(salt)
    report = DeidReport()
    say = log or (lambda _line: None)
    if not persistent:
        say(
            "note: no salt given (--salt-file or $MEDCLF_DEID_SALT): new UIDs are consistent within this run "
            "only"
        )
    single = not src_path.is_dir()
    file_target = single and not (out_path.is_dir() or str(out).endswith(("/", os.sep)))
    inputs = _inputs(src_path)
    for path, rel in inputs:
        try:
            size = check_file(path, limits)
            sniffed = sniff(path, size)
        except InputRejected as exc:
            if single:
                raise
            report.skipped.append((str(path), exc.message))
            say(f"skipped {exc.message}")
            continue
        if sniffed.format != "dicom":
            message = (
                f"not DICOM (the content is {sniffed.format.upper()}); only DICOM files are de-identified"
            )
            if single:
                raise InputRejected(message, reason="unsupported_format", path=str(path))
            report.skipped.append((str(path), f"{path}: {message}"))
            say(f"skipped {path}: {message}")
            continue
        target = out_path if file_target else out_path / rel
        try:
            _deidentify_file(
                path,
                rel,
                target,
                None if file_target else out_path,
                sniffed.bare_dicom,
                size,
                remap,
                allow_burned_in,
                limits,
                report,
            )
        except InputRejected as exc:
            if single:
                raise
            report.refused.append((str(path), exc.message))
            say(f"refused {exc.message}")
    for path in report.flagged:
        say(
            f"burned-in annotation: {path} declares text burned into its pixels, which may identify the patient; "
            + ("written anyway (--allow-burned-in), check it by eye" if allow_burned_in else "not written")
        )
    return report


def _deidentify_file(
    path: Path,
    rel: Path,
    target: Path,
    rename_root: Path | None,
    bare: bool,
    size: int,
    remap: _Remapper,
    allow_burned_in: bool,
    limits: ReadLimits,
    report: DeidReport,
) -> None:
    from medclf.io.dicom import check_structure

    check_structure(path, limits, size=size, bare=bare)
    with library_errors(path, "DICOM file", reason="malformed"):
        ds = pydicom.dcmread(str(path), force=bare)
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if transfer_syntax is None:
            implicit, little = ds.original_encoding
            transfer_syntax = (
                pydicom.uid.ImplicitVRLittleEndian
                if implicit
                else pydicom.uid.ExplicitVRLittleEndian
                if little
                else pydicom.uid.ExplicitVRBigEndian
            )
        burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"
        identity = _identity_strings(ds)
        preamble = ds.preamble if not bare else None
    if burned_in:
        report.flagged.append(str(path))
        if not allow_burned_in:
            raise InputRejected(
                "BurnedInAnnotation is YES: the pixels may show the patient's identity, which header "
                "de-identification cannot remove; not written (use --allow-burned-in after checking the images)",
                reason="burned_in_annotation",
                path=str(path),
            )
    rel_text = str(rel).lower()
    with library_errors(path, "DICOM file", reason="malformed"):
        deidentify_dataset(ds, remap)
        old_meta = getattr(ds, "file_meta", None)
        ds.file_meta = _new_file_meta(ds, old_meta, transfer_syntax)
        ds.preamble = b"\x00" * 128
    if rename_root is not None and any(s.lower() in rel_text for s in identity):
        # The name (file or folder) holds identity: write <new SOPInstanceUID>.dcm at the top of OUT.
        target = rename_root / f"{ds.get('SOPInstanceUID') or remap.uid(str(path))}.dcm"
        report.renamed.append(str(path))
    if preamble and executable_preamble(preamble):
        report.neutralised_preambles.append(str(path))
    if target.exists() and _same_file(target, path):
        raise InputRejected("the output would overwrite the input", reason="would_overwrite", path=str(path))
    try:
        _write_atomic(ds, target)
    except OSError as exc:
        raise MedclfError(f"{target}: cannot write the de-identified file ({exc.strerror or exc})") from None
    except Exception as exc:  # pydicom's writer on values it cannot encode (ValueError, struct.error, ...)
        raise InputRejected(
            f"cannot write the de-identified data set: {exc}", reason="malformed", path=str(path)
        ) from exc
    report.written.append((str(path), str(target)))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
