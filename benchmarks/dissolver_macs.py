"""The dissolver's multiply-accumulates per image and dissolving call, next to the paper's table.

    python benchmarks/dissolver_macs.py                               # the paper's UNet at 32, 64, 128 px
    python benchmarks/dissolver_macs.py --diffusion_model_path CKPT --image_size 32

Per resolution: thop's default count of the UNet (which skips the weight-standardised
convolutions, as the paper's figure does), the count with every convolution, the parameters,
and thop's count plus ResNet-18 at 224 px, the sum the paper's 2.33 / 3.84 / 9.90 G report
(``diffusion_models.macs``). Attention products are counted by neither.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.errors import exit_on_user_error  # noqa: E402
from common.flags import HelpFormatter, add_diff_resolution  # noqa: E402
from diffusion_models.ddpm import build_unet, ddpm_config, read_dissolver_checkpoint  # noqa: E402
from diffusion_models.macs import resnet18_macs, unet_macs  # noqa: E402

PAPER_GMACS = {32: 2.33, 64: 3.84, 128: 9.90}


def build_parser():
    p = argparse.ArgumentParser(prog="dissolver_macs.py", description=__doc__, formatter_class=HelpFormatter)
    add_diff_resolution(p, "--image_size", dest="image_size", nargs="+", default=[32, 64, 128],
                        help="sides in pixels to count at")
    p.add_argument("--diffusion_model_path", default=None,
                   help="count this dissolver checkpoint's UNet (left out: the one --unet_dim and --dim_mults give)")
    p.add_argument("--unet_dim", type=int, default=64, help="the UNet's base width (without a checkpoint)")
    p.add_argument("--dim_mults", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="the UNet's width per stage (without a checkpoint)")
    return p


@exit_on_user_error
def main(argv=None):
    a = build_parser().parse_args(argv)
    base = read_dissolver_checkpoint(a.diffusion_model_path, "cpu")["config"] if a.diffusion_model_path else None
    resnet = resnet18_macs()
    print("dissolver UNet cost per image and call (thop; attention products not counted). 'thop' is thop's "
          "default count, which skips the weight-standardised convolutions; 'all convolutions' adds them")
    for r in a.image_size:
        cfg = dict(base, image_size=r) if base else ddpm_config(image_size=r, unet_dim=a.unet_dim,
                                                                dim_mults=a.dim_mults)
        unet = build_unet(cfg).eval()
        n_params = sum(p.numel() for p in unet.parameters())
        as_paper, every = unet_macs(unet, r, cfg["channels"])
        paper = PAPER_GMACS.get(r)
        paper_s = f"{paper:.2f} G" if paper else "-"
        print(f"{r:>4} px: thop {as_paper / 1e9:6.2f} GMACs, all convolutions {every / 1e9:6.2f} GMACs, "
              f"{n_params / 1e6:.2f} M parameters; thop count + ResNet-18 at 224 px ({resnet / 1e9:.2f} G): "
              f"{(as_paper + resnet) / 1e9:6.2f} G   (paper: {paper_s})")
    print("note: the paper's 2.33 / 3.84 / 9.90 G are thop's default count of this UNet plus ResNet-18 at 224 px")


if __name__ == "__main__":
    main()
