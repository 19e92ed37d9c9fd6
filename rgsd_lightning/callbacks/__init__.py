"""Lightning callbacks of the stages: ExportArtifact (``export.py``), SyntheticSetWriter (``writer.py``),
RewardCurves (``reward_curves.py``)."""
