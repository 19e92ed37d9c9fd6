"""Commands of the rgsd CLI beyond fit/validate/test/predict (dispatched by rgsd_lightning.cli)."""
