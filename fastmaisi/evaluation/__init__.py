"""Evaluation: 2.5D FID (`fid.py`, ResNet-50 features in `resnet.py`), VAE reconstruction metrics (`recon.py`) and
the per-organ HU quality check over generated outputs (`quality.py`); `cli.py` is `fastmaisi eval`."""
