"""The programs' command lines: each program shows its own flags, every flag has help and one
shown default, a concept has one name across the programs (the paper's spellings as aliases),
and the paper's three commands parse as written."""
import argparse
import inspect
import re
import shlex

import pytest

import eval as eval_program
import eval_dissolver
import reproduce
import train as train_program
from cli.args import build_parser, parse_args
from common.flags import HelpFormatter
from diffusion_models import train_eval_ddpm as ddpm_program
from models.blur import KERNEL_SIZE, BlurShift

# the commands of the paper's README, with its placeholders filled in
PAPER_DDPM = "--mode train --dataset {dataset}"
PAPER_TRAIN = ("--data_root ../data --dataset {dataset} --model resnet18_imagenet --mode simclr_DIA "
               "--shift_trans_type diffusion_rotation --diff_resolution 32 --batch_size 32 --one_class_idx 0 "
               "--save_step 1  --diffusion_model_path dissolver.pt")
PAPER_EVAL = ("--mode ood_pre --dataset {dataset} --model resnet18_imagenet --ood_score CSI --shift_trans_type "
              "rotation --print_score --diffusion_upper_offset 0. --diffusion_offset 0. --ood_samples 10 "
              "--resize_factor 0.54 --resize_fix --one_class_idx 0 --load_path last.model")

TRAIN_ONLY = ("--epochs", "--optimizer", "--lr_init", "--resume_path", "--logdir", "--save_step", "--error_step",
              "--no_eval", "--diffusion_model_path", "--diff_resolution", "--kernel_size", "--contamination_ratio")
EVAL_ONLY = ("--score_folder", "--ood_score", "--ood_layer", "--ood_batch_size", "--print_score", "--save_results",
             "--save_scores_csv", "--threshold_quantile")


def parsers():
    return {"train": build_parser("train"), "eval": build_parser("eval"), "reproduce": reproduce.build_parser(),
            "train_eval_ddpm": ddpm_program.build_parser(), "eval_dissolver": eval_dissolver.build_parser()}


def options(parser):
    return {o for a in parser._actions for o in a.option_strings}


def program_help(main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_each_program_shows_its_own_flags(capsys):
    train_help = program_help(train_program.main, capsys)
    eval_help = program_help(eval_program.main, capsys)
    for flag in EVAL_ONLY:
        assert not re.search(re.escape(flag) + r"\b", train_help), flag
        assert flag in eval_help
    for flag in TRAIN_ONLY:
        assert not re.search(re.escape(flag) + r"\b", eval_help), flag
        assert flag in train_help
    # a flag of the other program is refused, as any unknown flag
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["--score_folder", "x"])
    with pytest.raises(SystemExit):
        build_parser("eval").parse_args(["--epochs", "3"])
    capsys.readouterr()


def test_a_mode_of_the_other_program_names_it():
    from common.errors import UserError

    with pytest.raises(UserError, match="run eval.py"):
        parse_args("train", ["--mode", "ood_pre"])
    with pytest.raises(UserError, match="run train.py"):
        parse_args("eval", ["--mode", "simclr_CSI", "--load_path", "x.model"])


@pytest.mark.parametrize("program", ["train", "eval", "reproduce", "train_eval_ddpm", "eval_dissolver"])
def test_every_flag_has_help_and_one_shown_default(program):
    parser = parsers()[program]
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        name = "/".join(action.option_strings)
        assert action.help and action.help is not argparse.SUPPRESS and action.help.strip(), name
        shown = formatter._get_help_string(action)
        assert shown.replace("%(default)s", "").count("default") <= 1, (name, shown)
        if action.default is not None and action.nargs != 0 and not isinstance(action, argparse._HelpAction):
            assert "(default: %(default)s)" in shown, name
        # help says what a flag does: no timings or measurements, no history
        assert not re.search(r"\d\s*(s|ms|seconds|minutes)\b|measured on|\d+(\.\d+)?x\b", action.help), name
        assert not re.search(r"used to|earlier|no longer|\bgone\b|previously", action.help), name


def test_aliases_parse_to_one_name():
    ddpm = ddpm_program.build_parser()
    assert ddpm.parse_args(["--diff_resolution", "64"]).image_size == 64
    assert ddpm.parse_args(["--image_size", "64"]).image_size == 64
    assert ddpm.parse_args(["--on_label", "2"]).one_class_idx == ddpm.parse_args(["--one_class_idx", "2"]).one_class_idx
    dissolver_eval = eval_dissolver.build_parser()
    assert dissolver_eval.parse_args(["--image_size", "64"]).image_size == 64
    assert dissolver_eval.parse_args(["--diff_resolution", "64"]).image_size == 64
    # train.py's name for range correction, and the dissolver evaluation's own spelling
    assert dissolver_eval.parse_args(["--diffusion_range_correct"]).range_correct
    assert dissolver_eval.parse_args(["--range_correct"]).range_correct
    train = build_parser("train")
    assert train.parse_args(["--diffusion_range_correct"]).diffusion_range_correct
    assert train.parse_args(["--local-rank", "1"]).local_rank == train.parse_args(["--local_rank", "1"]).local_rank == 1


def test_shared_flags_mean_the_same_in_every_program():
    """--data_root, --diff_resolution, --seed, --device and --amp come from common/flags.py; --model from
    cli/args.py with the names models/resnet.py builds."""
    from models.resnet import MODEL_NAMES

    found = {}
    for program, parser in parsers().items():
        for action in parser._actions:
            for flag in ("--amp", "--device", "--data_root", "--diff_resolution", "--model"):
                if flag in action.option_strings:
                    found.setdefault(flag, {})[program] = action
    assert set(found["--amp"]) == set(parsers()) - {"eval_dissolver"}
    assert set(found["--device"]) == set(parsers())
    assert set(found["--data_root"]) == set(parsers())
    assert set(found["--diff_resolution"]) == {"train", "reproduce", "train_eval_ddpm", "eval_dissolver"}
    assert {(a.const, tuple(a.choices)) for a in found["--amp"].values()} == {("on", ("auto", "on", "off"))}
    assert {tuple(a.choices) for a in found["--model"].values()} == {MODEL_NAMES}
    assert found["--data_root"]["train"].default == found["--data_root"]["train_eval_ddpm"].default == "../data"


def test_kernel_size_default_is_the_papers_and_defined_once():
    """The paper's parser (common/common.py) defaults --kernel_size to 7 and passes it to every blur."""
    assert KERNEL_SIZE == 7
    assert build_parser("train").get_default("kernel_size") == KERNEL_SIZE
    assert inspect.signature(BlurShift).parameters["kernel_size"].default == KERNEL_SIZE


@pytest.mark.parametrize("dataset", ["kvasir", "covid"])
def test_the_papers_commands_parse_as_written(dataset, capsys):
    args = ddpm_program.parse_args(shlex.split(PAPER_DDPM.format(dataset=dataset)))
    assert (args.mode, args.dataset, args.image_size) == ("train", dataset, 32)
    P = parse_args("train", shlex.split(PAPER_TRAIN.format(dataset=dataset)))
    assert (P.dataset, P.model, P.mode, P.shift_trans_type, P.diff_resolution, P.batch_size, P.one_class_idx,
            P.save_step, P.diffusion_model_path) == (dataset, "resnet18_imagenet", "simclr_DIA", "diffusion_rotation",
                                                     32, 32, 0, 1, "dissolver.pt")
    P = parse_args("eval", shlex.split(PAPER_EVAL.format(dataset=dataset)))
    assert (P.mode, P.ood_score, P.ood_samples, P.resize_factor, P.resize_fix, P.print_score, P.load_path) == \
        ("ood_pre", ["CSI"], 10, 0.54, True, True, "last.model")
    capsys.readouterr()


def test_the_paper_dissolver_spelling_of_the_resolution_still_runs():
    assert ddpm_program.parse_args(["--dataset", "kvasir", "--image_size", "64"]).image_size == 64
    assert ddpm_program.parse_args(["--dataset", "kvasir", "--diff_resolution", "64"]).image_size == 64
