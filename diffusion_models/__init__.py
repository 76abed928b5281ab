"""The dissolver: a DDPM (``denoising_diffusion_pytorch``) trained on the normal class.

``diffusion_models.ddpm`` builds, saves and loads it; ``train_eval_ddpm.py`` trains it with
``trainer.DissolverTrainer`` on the images of ``ddpm_data``; ``macs`` counts its cost. The
top-level ``eval_dissolver.py`` draws its dissolving figure.
"""
