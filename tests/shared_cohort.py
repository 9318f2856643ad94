"""The shared synthetic cohort's settings: generated and imported once per session (tests/conftest.py)."""

TEST_PATIENT_KEY_SECRET = "test-patient-key-secret"  # the importer's keyed patient hash in tests
COHORT_STUDIES = 24
COHORT_DICOM_SIZE = 320  # DICOM long side (px): small, but larger than the display so it is resized
COHORT_LONG_SIDE = 256  # display PNG long side (px)
