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
* Every attribute the table does not name is caught by its value representation (the table lists ~600
  attributes; the standard has more, and each edition adds some): a person's name (PN), date (DA), date
  and time (DT) or time (TM) gets a dummy value, a UID (UI) is remapped like ``U`` except the class,
  transfer syntax and coding scheme UIDs of :data:`KEPT_UIDS`, and an attribute of unknown type (UN) is
  removed. UIDs the standard registers (SOP classes, well-known frames of reference, ...) are never
  remapped: they identify nobody.
* All private attributes are removed, and so are curves (groups 50xx) and overlays (groups 60xx), which
  can carry burned-in text.
* Compressed frames lose the text a JPEG or JPEG 2000 stream can carry besides the image: JPEG comment
  (COM) and application (APPn: Exif, XMP, ICC, thumbnails) segments are removed and the frames
  re-encapsulated with a new offset table; JPEG 2000 comments are blanked in place. Pixel data compressed
  in a form medclf cannot walk (MPEG, HEVC, ...) is refused.
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

Not done (options of the standard beyond the Basic Profile): cleaning free text (LO, SH, ST, LT, UT, ...)
of attributes the table does not name, the "Retain ..." options, and pixel-level removal of burned-in text. File and folder names are kept,
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
from pydicom.uid import UID

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
# UI attributes that name a kind of thing (SOP class, transfer syntax, coding scheme, context group,
# mapping resource), never a patient, study or instance: kept as they are. Every other UI is remapped.
_KEPT_UID_KEYWORDS = """AffectedSOPClassUID AvailableTransferSyntaxUID CodingSchemeUID ContextUID EncryptedContentTransferSyntaxUID
FlowTransferSyntaxUID MACCalculationTransferSyntaxUID MappingResourceUID MediaStorageSOPClassUID
OriginalSpecializedSOPClassUID PertinentSOPClassesInSeries PertinentSOPClassesInStudy ReferencedRelatedGeneralSOPClassUIDInFile
ReferencedSOPClassUID ReferencedSOPClassUIDInFile ReferencedTransferSyntaxUIDInFile RelatedGeneralSOPClassUID
RequestedSOPClassUID RTVCommunicationSOPClassUID SOPClassesInStudy SOPClassesSupported SOPClassUID
StoredInstanceTransferSyntaxUID TransferSyntaxUID"""
KEPT_UIDS = frozenset(_KEPT_UID_KEYWORDS.split())
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
    # inputs whose compressed frames held comments or application segments (removed or blanked)
    cleaned_pixel_metadata: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": [{"input": i, "output": o} for i, o in self.written],
            "skipped": [{"input": i, "reason": r} for i, r in self.skipped],
            "refused": [{"input": i, "reason": r} for i, r in self.refused],
            "burned_in_annotation": self.flagged,
            "renamed": self.renamed,
            "neutralised_preambles": self.neutralised_preambles,
            "cleaned_pixel_metadata": self.cleaned_pixel_metadata,
        }


class _Remapper:
    """Keyed, deterministic replacements: UIDs and the patient pseudonym."""

    def __init__(self, salt: bytes) -> None:
        self._salt = salt

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._salt, f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        value = str(value).strip()
        if not value or UID(value).keyword:  # empty, or a UID the standard registers (identifies no one)
            return value
        return "2.25." + str(int.from_bytes(self._digest("uid", value)[:16], "big"))

    def pseudonym(self, patient_id: str) -> str:
        return "ANON-" + self._digest("patient", str(patient_id).strip()).hex()[:12].upper()


def _dummy(elem: pydicom.DataElement, remap: _Remapper) -> Any:
    vr = str(elem.VR)
    if vr == "UI":  # a dummy UID: the keyed remapping, so references to it stay consistent
        return _remap_uids(elem, remap)
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


def _remap_uids(elem: pydicom.DataElement, remap: _Remapper) -> Any:
    if elem.VM > 1:
        return [remap.uid(v) for v in elem.value]
    return remap.uid(elem.value) if elem.value else elem.value


def _catch_all_action(elem: pydicom.DataElement) -> str | None:
    """The action for an attribute the profile's table does not name, decided by its value representation.

    The table names ~600 attributes; the standard has more, and every edition adds some (EvaluatorName,
    StudyUpdateDateTime, SOPInstanceUIDOfConcatenationSource, ...). A person's name, a date or time and an
    instance UID identify whatever attribute holds them, so: PN, DA, DT, TM -> a dummy value (valid
    whatever the attribute's type, like ``D``); UI -> remapped, except the class, transfer syntax and
    coding scheme UIDs of :data:`KEPT_UIDS` (they name kinds of things, not patients or instances);
    UN (a public attribute this pydicom does not know, so its content cannot be judged) -> removed.
    """
    vr = str(elem.VR)
    if vr in ("PN", "DA", "DT", "TM"):
        return "D" if elem.value not in (None, "", b"") else None
    if vr == "UI":
        return None if elem.keyword in KEPT_UIDS else "U"
    if vr == "UN":
        return "X"
    return None


def _apply_profile(ds: Dataset, remap: _Remapper, pseudonym: str | None) -> None:
    """Apply the Basic Profile to ``ds`` and, recursively, to every item of every sequence in it; the
    attributes the table does not name get :func:`_catch_all_action`. Each element is handled once, so
    every UID is remapped exactly once and references stay consistent."""
    for elem in list(ds):
        tag = int(elem.tag)
        group = tag >> 16
        if elem.tag.is_private or (group & 0xFF00) in (0x5000, 0x6000):
            del ds[elem.tag]  # private attributes, curves, overlays
            continue
        action = _ACTIONS.get(tag) or _catch_all_action(elem)
        if action == "X":
            del ds[elem.tag]
        elif action in ("Z", "D"):
            if elem.keyword in ("PatientName", "PatientID") and pseudonym:
                elem.value = pseudonym  # a dummy value, the same one for all files of the patient
            else:
                elem.value = _dummy(elem, remap) if action == "D" else _empty(elem)
        elif action == "U":
            elem.value = _remap_uids(elem, remap)
        if elem.tag in ds and elem.VR == "SQ":
            for item in elem.value or []:
                _apply_profile(item, remap, pseudonym)


# -- metadata inside compressed frames --------------------------------------------------------------------
#
# A JPEG frame can carry text of its own, invisible to a header edit: comment segments (COM) and
# application segments (APP0-APP15: Exif, XMP, ICC, vendor data, thumbnails). JPEG 2000 has COM segments.
# A JPEG decoder needs none of them, with three exceptions kept only in their fixed-size forms, which have
# no room for text: APP0 "JFIF" without a thumbnail and APP14 "Adobe" (they tell a decoder whether three
# components are YCbCr or RGB), and APP8 "mrfx" (CharLS's JPEG-LS colour transform). Every other APPn and
# every COM is removed. JPEG 2000 segments carry lengths that other segments count (Psot, TLM), so a
# COM there is blanked in place (same length, zero bytes) rather than removed.
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
_KEPT_APP = {0xE0: (b"JFIF\0", 14), 0xE8: (b"mrfx", 5), 0xEE: (b"Adobe", 12)}


def _kept_app_segment(marker: int, body: bytes) -> bool:
    ident, size = _KEPT_APP.get(marker, (None, -1))
    if ident is None or len(body) != size or not body.startswith(ident):
        return False
    return marker != 0xE0 or body[12:14] == b"\0\0"  # JFIF: no thumbnail (a thumbnail is an image)


def strip_jpeg_metadata(frame: bytes) -> tuple[bytes, int]:
    """``frame`` (JPEG or JPEG-LS) without COM and APPn segments (see above), and how many were removed.

    Markers are walked one by one (through the entropy-coded data of every scan), never searched for, and
    bytes after EOI are dropped. A frame that does not parse raises ``ValueError``.
    """
    data = bytes(frame)
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise ValueError("the frame does not start with a JPEG SOI marker")
    out = bytearray(b"\xff\xd8")
    removed, i = 0, 2
    while True:
        if i + 1 >= n or data[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i} of the frame")
        while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes before a marker
            i += 1
        marker = data[i + 1]
        if marker == 0xD9:  # EOI
            out += b"\xff\xd9"
            if data[i + 2 :].strip(b"\0"):
                removed += 1  # data hidden after the end of the image (not fragment padding)
            return bytes(out), removed
        if marker in _JPEG_STANDALONE:
            if marker == 0xD8:
                raise ValueError("a second SOI marker inside the frame")
            out += data[i : i + 2]
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > n:
            raise ValueError(f"JPEG segment 0xFF{marker:02X} at byte {i} runs past the end of the frame")
        body = data[i + 4 : i + 2 + length]
        if marker == 0xFE or (0xE0 <= marker <= 0xEF and not _kept_app_segment(marker, body)):
            removed += 1
        else:
            out += data[i : i + 2 + length]
        i += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            j = i
            while True:
                k = data.find(b"\xff", j)
                if k < 0 or k + 1 >= n:
                    raise ValueError("the entropy-coded data runs to the end of the frame without EOI")
                follower = data[k + 1]
                if follower == 0xFF:
                    j = k + 1
                elif follower >= 0xC0 and not 0xD0 <= follower <= 0xD7:
                    break  # a marker (0xFF00 is a stuffed byte, 0xFFD0-D7 restarts; JPEG-LS data < 0x80)
                else:
                    j = k + 2
            out += data[i:k]
            i = k


def blank_j2k_comments(frame: bytes) -> tuple[bytes, int]:
    """``frame`` (a JPEG 2000 codestream) with the content of every COM segment, in the main header and in
    tile-part headers, replaced by zero bytes; and how many there were. Lengths stay as they are."""
    data = bytearray(frame)
    n = len(data)
    if data[:4] != b"\xff\x4f\xff\x51":
        raise ValueError("the frame is not a JPEG 2000 codestream (SOC, SIZ); JP2 boxes are not allowed here")
    blanked = 0

    def marker_at(i: int) -> int:
        if i + 2 > n:
            raise ValueError("the JPEG 2000 codestream ends inside a header")
        return int.from_bytes(data[i : i + 2], "big")

    def header(i: int, end_marker: int) -> int:
        """Walk marker segments from ``i`` up to ``end_marker``; blank COM contents; return its offset."""
        nonlocal blanked
        while (marker := marker_at(i)) != end_marker:
            if marker >> 8 != 0xFF:
                raise ValueError(f"no JPEG 2000 marker at byte {i}")
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            if length < 2 or i + 2 + length > n:
                raise ValueError(f"JPEG 2000 segment 0x{marker:04X} runs past the end of the frame")
            if marker == 0xFF64:  # COM: Rcom (2 bytes), then the comment
                data[i + 4 : i + 2 + length] = bytes(length - 2)
                blanked += 1
            i += 2 + length
        return i

    i = header(2, 0xFF90)  # main header, up to the first SOT
    while i < n and marker_at(i) == 0xFF90:
        start = i
        psot = int.from_bytes(data[i + 6 : i + 10], "big")  # tile-part length from its SOT; 0: up to EOC
        i = header(i + 12, 0xFF93) + 2  # tile-part header, up to SOD
        if psot == 0:
            break
        if psot < i - start or start + psot > n:
            raise ValueError("a JPEG 2000 tile-part length (Psot) does not fit the frame")
        i = start + psot
    return bytes(data), blanked


def _clean_compressed_frames(ds: Dataset, transfer_syntax: Any, path: Path) -> int:
    """Remove the metadata segments of every compressed frame of ``ds`` (see above); the number removed.

    The frames are re-encapsulated, with a new Basic (or Extended) Offset Table, only when something was
    removed. Pixel data compressed in a way medclf cannot check (video, JPEG XL, ...) is refused.
    """
    from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames, parse_basic_offsets
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import (
        JPEG2000TransferSyntaxes,
        JPEGLSTransferSyntaxes,
        JPEGTransferSyntaxes,
        RLETransferSyntaxes,
    )

    syntax = UID(str(transfer_syntax))
    if "PixelData" not in ds or not syntax.is_transfer_syntax or not syntax.is_encapsulated:
        return 0
    if syntax in RLETransferSyntaxes:
        return 0  # RLE segments hold pixel values only: nothing but the image to remove
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        clean = strip_jpeg_metadata
    elif syntax in JPEG2000TransferSyntaxes:
        clean = blank_j2k_comments
    else:
        raise InputRejected(
            f"the pixel data is compressed as {syntax.name}, whose frames medclf cannot check for embedded "
            "text; not written",
            reason="unsupported_compression",
            path=str(path),
        )
    with library_errors(path, "compressed pixel data", reason="malformed"):
        pixel_data = ds.PixelData
        n_frames = int(ds.get("NumberOfFrames") or 1)
        try:
            cleaned, counts = zip(
                *(clean(f) for f in generate_frames(pixel_data, number_of_frames=n_frames)), strict=True
            )
        except ValueError as exc:
            raise InputRejected(
                f"a compressed frame cannot be parsed ({exc}); not written",
                reason="malformed",
                path=str(path),
            ) from None
        if not sum(counts):
            return 0
        if "ExtendedOffsetTable" in ds:
            ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
                list(cleaned)
            )
        else:
            stream = DicomBytesIO(pixel_data)
            stream.is_little_endian = True
            had_offsets = bool(parse_basic_offsets(stream))
            ds.PixelData = encapsulate(list(cleaned), has_bot=had_offsets)
        ds["PixelData"].is_undefined_length = True
    return int(sum(counts))


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
    for flagged in report.flagged:
        say(
            f"burned-in annotation: {flagged} declares text burned into its pixels, which may identify the patient; "
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
    if _clean_compressed_frames(ds, transfer_syntax, path):
        report.cleaned_pixel_metadata.append(str(path))
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
