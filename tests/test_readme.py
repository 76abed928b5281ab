"""README.md as a reader uses it: every command in its code blocks is accepted by the program's own
parser (no training: the flags are parsed, nothing runs), every relative link in README.md and
docs/*.md names a file of the repository, the README stays under 300 lines, and every docs page
says what it is for in one line under its title."""
import contextlib
import glob
import io
import os
import re
import shlex

from torch.distributed.run import get_args_parser as torchrun_parser

import eval_dissolver
import reproduce
from cli.args import build_parser
from common.errors import UserError
from datasets.registry import check_dataset_name
from diffusion_models import train_eval_ddpm
from diffusion_models.ddpm_data import paper_dataset_name
from helpers import ROOT

README = os.path.join(ROOT, "README.md")
MAX_README_LINES = 300
PYTHONS = {"python", "python3", ".venv/bin/python"}
# what a placeholder of the README stands for when its command is parsed; any other <...> is a path
PLACEHOLDERS = {"<DATASET>": "kvasir"}
# the programs the README may run, each with what checks its flags
CHECKED = ("train.py", "eval.py", "reproduce.py", "diffusion_models/train_eval_ddpm.py", "eval_dissolver.py")


def read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def code_blocks(text):
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def shell_lines(body):
    """The logical lines of a shell block: continuations joined."""
    return body.replace("\\\n", " ").splitlines()


def commands(text):
    """Every command of the README's shell blocks that runs a program, as a token list (split at
    ``&&``, ``;`` and ``|``; comments dropped)."""
    out = []
    for lang, body in code_blocks(text):
        if lang not in ("bash", "sh", "shell", ""):
            continue
        for line in shell_lines(body):
            if not re.search(r"(^|\s)(python3?|\.venv/bin/python|torchrun|bash)\s", line):
                continue  # a layout tree or prose
            tokens = shlex.split(line, comments=True)
            cmd = []
            for tok in tokens + ["&&"]:
                if tok in ("&&", ";", "|", "||"):
                    if cmd:
                        out.append(cmd)
                    cmd = []
                else:
                    cmd.append(tok)
    return out


def fill(tokens):
    """Placeholders replaced by values the parsers accept."""
    out = []
    for tok in tokens:
        for key, value in PLACEHOLDERS.items():
            tok = tok.replace(key, value)
        out.append(re.sub(r"<[^<>]+>", "placeholder", tok))
    return out


def program_and_args(tokens):
    """(program, its arguments) of a command: ``python X.py ...``, ``torchrun [opts] X.py ...``
    (torchrun's own options parsed by torchrun's parser), ``bash script`` (program only); None for
    commands of other tools (``python -m pytest``)."""
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # VAR=value before the command
        tokens = tokens[1:]
    if tokens[0] in PYTHONS:
        if tokens[1] == "-m":
            if tokens[2] in ("torch.distributed.run", "torch.distributed.launch"):
                return program_and_args(["torchrun", *tokens[3:]])
            return None
        return tokens[1], tokens[2:]
    if tokens[0] == "torchrun":
        ns = torchrun_parser().parse_args(tokens[1:])
        return ns.training_script, list(ns.training_script_args)
    if tokens[0] == "bash":
        return tokens[1], None
    raise AssertionError(f"the README runs {tokens[0]!r}, which this test does not know how to check")


def check_flags(program, args):
    """Parse ``args`` with ``program``'s own parser; argparse's SystemExit and UserError propagate."""
    if program == "train.py":
        build_parser("train").parse_args(args)
    elif program == "eval.py":
        build_parser("eval").parse_args(args)
    elif program == "reproduce.py":
        a = reproduce.resolve_args(args)
        reproduce.normalise_transformations(a.shift_trans_type)
        for name in a.dataset or []:
            check_dataset_name(name)
    elif program == "diffusion_models/train_eval_ddpm.py":
        a = train_eval_ddpm.build_parser().parse_args(args)
        if a.dataset:
            check_dataset_name(paper_dataset_name(a.dataset))
    elif program == "eval_dissolver.py":
        a = eval_dissolver.build_parser().parse_args(args)
        if a.dataset:
            check_dataset_name(paper_dataset_name(a.dataset))
    else:
        raise AssertionError(f"the README runs {program}; add its parser to tests/test_readme.py")


def refusal(tokens):
    """None when the command parses; else what its program said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            found = program_and_args(fill(tokens))
            if found is None:
                return None
            program, args = found
            if args is None:  # bash script: it must exist
                return None if os.path.isfile(os.path.join(ROOT, program)) else f"{program} does not exist"
            check_flags(program, args)
    except SystemExit as exc:
        return f"exit {exc.code}: {err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ''}"
    except UserError as exc:
        return f"UserError: {exc}"
    return None


def test_every_readme_command_parses():
    cmds = commands(read(README))
    programs = set()
    bad = []
    for tokens in cmds:
        why = refusal(tokens)
        if why:
            bad.append(f"{shlex.join(tokens)[:160]}\n    -> {why}")
            continue
        found = program_and_args(fill(tokens))
        if found:
            programs.add(found[0])
    assert not bad, "README commands the programs refuse:\n" + "\n".join(bad)
    # the README shows every program a reader needs; a README whose blocks were not found fails here
    assert set(CHECKED) <= programs, f"README runs {sorted(programs)}; expected at least {CHECKED}"


def test_the_checker_catches_a_wrong_flag_and_a_wrong_value():
    assert refusal(["python", "train.py", "--no_such_flag"]).startswith("exit 2")
    assert refusal(["python", "reproduce.py", "--preset", "quick", "--shift_trans_type", "diffusion_rotate"])
    assert refusal(["torchrun", "--nproc_per_node", "2", "eval.py", "--ood_score", "nope"]).startswith("exit 2")
    assert refusal(["python", "eval.py", "--load_path", "<run>/last.model", "--score_folder", "d/"]) is None
    assert "does not exist" in refusal(["bash", "scripts/no_such_script.sh"])
    assert commands("```bash\npython train.py \\\n    --epochs 3 && python eval.py  # a comment\n```\n") == [
        ["python", "train.py", "--epochs", "3"], ["python", "eval.py"]]


def markdown_files():
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def relative_links(text):
    """The link targets of a Markdown text outside code (fenced blocks and `spans`), without
    web addresses and in-page anchors, each without its #fragment."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text) + re.findall(r"src=\"([^\"]+)\"", text)
    return [t.split("#")[0] for t in targets if not re.match(r"(https?:|mailto:|#)", t)]


def test_every_relative_link_resolves():
    missing = []
    n = 0
    for path in markdown_files():
        for target in relative_links(read(path)):
            n += 1
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), target))):
                missing.append(f"{os.path.relpath(path, ROOT)}: {target}")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)
    assert n >= 10  # README.md links the docs pages, the figure, LICENSE and CITATION.cff


def test_relative_links_are_found_and_code_is_skipped():
    text = "See [a](docs/a.md#x), [web](https://x.org), [top](#top), `[no](b.md)` and ![f](img/f.png).\n"
    assert relative_links(text + "```\n[c](c.md)\n```\n") == ["docs/a.md", "img/f.png"]


def test_readme_is_short():
    n = len(read(README).splitlines())
    assert n < MAX_README_LINES, f"README.md has {n} lines; keep it under {MAX_README_LINES} (move reference to docs/)"


def test_each_docs_page_says_what_it_is_for_in_one_line():
    for path in glob.glob(os.path.join(ROOT, "docs", "*.md")):
        lines = read(path).splitlines()
        name = os.path.relpath(path, ROOT)
        assert lines[0].startswith("# "), f"{name} starts with its title"
        assert lines[1] == "" and lines[2].strip() and (len(lines) < 4 or lines[3] == ""), \
            f"{name}: the paragraph under the title is one line saying what the page is for"
