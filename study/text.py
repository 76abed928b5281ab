"""How the tables and the progress lines write numbers, paths and cell text."""
import os


def num(v):
    return "" if v is None else round(float(v), 10)


def rel(path, start):
    return os.path.relpath(path, start)


def md_escape(text, limit=None, first_clause=False):
    """``text`` on one line for a table cell; ``first_clause`` keeps what comes before the first
    '; ' (the messages say what is wrong, then what to do); ``limit`` cuts it with an ellipsis."""
    text = " ".join(str(text).split())
    if first_clause:
        text = text.split("; ")[0]
    if limit and len(text) > limit:
        text = text[:limit - 1].rstrip() + "…"
    return text.replace("|", "\\|")


def fmt(v, digits=3):
    return "" if v is None or v == "" else f"{float(v):.{digits}f}"
