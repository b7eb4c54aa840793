"""Guidance: the SDS / VSD update (distill.py) and VSD's noise predictor eps_phi
(a camera-conditioned LoRA on the UNet: lora.py, eps_phi.py)."""
