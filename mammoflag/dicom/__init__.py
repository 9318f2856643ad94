"""DICOM mammogram -> display image, shared by the importer and the flagger (pydicom's style).

- ``normalize``: read a file, check it, and turn each frame into a display image with its hints;
- ``decode``: the pixel words out of each transfer syntax (size caps and truncation checks
  before and after decoding; reduced-resolution JPEG 2000);
- ``display``: the greyscale display chain (Modality LUT, VOI LUT / windows, MONOCHROME1, padding);
- ``render``: the resize to the display size and one frame's rendering;
- ``headers``: header hints and the patient key;
- ``types``: the options, results and problem types.
"""
