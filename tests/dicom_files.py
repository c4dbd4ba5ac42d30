"""DICOM files for the tests, built with pydicom: an ultrasound scan wrapped as a scanner writes it (a frame
bigger than the image, with text and a colour bar around it, the Sequence of Ultrasound Regions, the physical
delta, and patient fields filled in), and broken ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import image_io
SAMPLE_SCAN = Path(__file__).resolve().parent.parent / "data" / "busi_sample" / "benign" / "benign (4).png"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
# Patient and study fields a scanner fills in; none of them may reach an output
PATIENT = {"PatientName": "Testpatient^Marianne", "PatientID": "PID-7734519", "PatientBirthDate": "19610923",
           "StudyDate": "20240611", "StudyTime": "101503", "AccessionNumber": "ACC-99120",
           "InstitutionName": "Sample General Hospital", "ReferringPhysicianName": "Referrer^Otto",
           "OperatorsName": "Sonographer^Ida", "PatientSex": "F", "PatientAge": "062Y"}
BORDER = (40, 24, 60, 30)  # left, top, right, bottom: the scanner's margins around the image region


def sample_grey() -> np.ndarray:
    return image_io.load_image(SAMPLE_SCAN)  # the grey pixels predict reads from the PNG


def framed(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`image` inside a scanner's frame (text at the top, a colour bar at the right); (frame, region x0,y0,x1,y1
    inclusive, as DICOM writes it)."""
    left, top, right, bottom = BORDER
    h, w = image.shape
    frame = np.zeros((h + top + bottom, w + left + right), dtype=np.uint8)
    frame[top:top + h, left:left + w] = image
    frame[4:16, 10:200] = 255  # burned-in text of the scanner
    frame[top:top + h, -40:-20] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]  # grey bar
    return frame, (left, top, left + w - 1, top + h - 1)


def us_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", *, frames: int | None = None,
               region=None, delta_cm=None, units: int = 3, patient: bool = True) -> Dataset:
    """An Ultrasound (Multi-frame) Image Storage object holding `pixels` (HxW, HxWx3, or FxHxW[x3] uint8)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = US_MULTIFRAME if frames else US_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    if patient:
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
    colour = pixels.shape[-1] == 3 and pixels.ndim == (4 if frames else 3)
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames else pixels.shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames:
        ds.NumberOfFrames = frames
    if region is not None:
        item = Dataset()
        item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = 1, 1, 0
        item.RegionLocationMinX0, item.RegionLocationMinY0, item.RegionLocationMaxX1, item.RegionLocationMaxY1 = region
        item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = units
        item.PhysicalDeltaX, item.PhysicalDeltaY = delta_cm if delta_cm is not None else (0.01, 0.01)
        ds.SequenceOfUltrasoundRegions = Sequence([item])
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


def save(ds: Dataset, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def wrapped_scan(path, delta_cm=(0.01, 0.012), **kwargs) -> Path:
    """The sample scan, framed, as a scanner's DICOM file with its region and physical delta (cm per pixel)."""
    frame, region = framed(sample_grey())
    return save(us_dataset(frame, region=region, delta_cm=delta_cm, **kwargs), path)
