"""The DICOM files the tests read: the ones pydicom ships in its test-files folder (CT_small.dcm, MR_small.dcm,
badVR.dcm, ...)."""
from __future__ import annotations

import os

import pydicom.data

DICOM_DIR = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
