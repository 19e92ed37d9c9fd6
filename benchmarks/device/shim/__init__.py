"""The stand-ins the device runs put on PYTHONPATH (this folder itself, not the package)."""
