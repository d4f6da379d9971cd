"""DICOM awareness: the study index, study prefetch and the study-level cache policy."""
