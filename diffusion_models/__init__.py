"""The dissolver: a DDPM (``denoising_diffusion_pytorch``) trained on the normal class.

``diffusion_models.ddpm`` builds, saves and loads it; ``train_eval_ddpm.py`` trains it and
draws the dissolving figure.
"""
