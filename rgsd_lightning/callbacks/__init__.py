"""Lightning callbacks of the stages: ExportArtifact (``export.py``), SyntheticSetWriter (``writer.py``)."""
