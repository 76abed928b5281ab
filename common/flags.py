"""Flags that train.py, eval.py, reproduce.py and the dissolver's script
(diffusion_models/train_eval_ddpm.py) share: each is defined here once, and each program adds
the ones it has to its own parser.

The flags that need the library's names (models, datasets, dissolving schedulers) live in
``cli/args.py``; this module imports nothing above ``common`` so that ``diffusion_models/``
may use it.
"""
import argparse

from common.device import AMP_CHOICES, CUBLAS_WORKSPACE

DATA_ROOT = "../data"
# the side in pixels at which the dissolver works: the paper's train.py --diff_resolution default
# and its dissolver script's image size for 32-px and MedMNIST data
DIFF_RESOLUTION = 32


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and each flag's default after its help. Not shown: a default of
    None (the help says in words what leaving the flag out does) and a switch's (a flag without a
    value: its help says what giving it does)."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def add_data_root(group, default=DATA_ROOT):
    group.add_argument("--data_root", default=default, metavar="DIR",
                       help="folder that holds the datasets in their distributed layout")


def add_diff_resolution(group, *aliases, dest="diff_resolution", default=DIFF_RESOLUTION, nargs=None, help=None):
    """``--diff_resolution`` (the paper's train.py spelling); ``aliases`` are other spellings of it."""
    group.add_argument("--diff_resolution", *aliases, dest=dest, type=int, default=default, nargs=nargs, metavar="PX",
                       help=help or "side in pixels at which images are dissolved")


def add_seed(group, help, default=0):
    group.add_argument("--seed", type=int, default=default, help=help)


def add_device(group, help="cpu, cuda or cuda:N; left out: CUDA when present, else the CPU"):
    group.add_argument("--device", default=None, help=help)


def add_amp(group, default="auto", what="the forward passes", older_gpu="fp16 with dynamic loss scaling"):
    """``--amp [auto|on|off]``; ``--amp`` alone is ``on``. ``what``: what runs under autocast;
    ``older_gpu``: what auto runs on a GPU without native bf16."""
    group.add_argument("--amp", nargs="?", const="on", default=default, choices=AMP_CHOICES,
                       help=f"mixed precision of {what}, decided once the process's device is set: auto = bf16 "
                            f"autocast where the device computes bf16 natively (CUDA capability 8.0 or more, a CPU "
                            f"with AVX512-BF16 or AMX), {older_gpu} on an older GPU, else fp32; --amp alone = on "
                            f"(bf16 on any CPU, emulated where not native); off = fp32 throughout, as the paper's "
                            f"code. A resumed run may compute in another precision (a line says so)")


def add_deterministic(group):
    """``--deterministic``: cuDNN's and PyTorch's deterministic algorithms (common.device.make_deterministic)."""
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic GPU kernels: cuDNN's deterministic convolutions without autotuning, "
                            "torch.use_deterministic_algorithms (an operation without one warns, naming itself) and "
                            "CUBLAS_WORKSPACE_CONFIG=" + CUBLAS_WORKSPACE + ", so that a GPU run repeats and resumes "
                            "bit for bit (slower); the CPU computes so without it (docs/gpu.md)")
