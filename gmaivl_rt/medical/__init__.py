"""Medical image input: one module per format (`dicom`, `nifti`, `images` for PNG / JPEG / TIFF / BMP), CT/MR
windowing (`windowing`), segmentation masks (`masks`), the file reader over them (`reader.read_medical_image`), and
the converter every request and dataset uses (`convert.to_medical_image`). Imports only the base."""
