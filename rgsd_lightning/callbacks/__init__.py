"""Lightning callbacks of the stages: ExportArtifact (``export.py``) and SyntheticSetWriter (``writer.py``)."""
