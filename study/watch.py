"""A running step's progress, as reproduce.py shows it: read from the JSON file the step writes
(``common.progress``: train.py's and the dissolver's ``--progress_file``)."""
import sys
import time

from tqdm import tqdm

from common.progress import progress_text, read_progress


class ProgressWatch:
    """Shows the progress a step writes to ``path`` while it runs, each time :meth:`poll` is called.

    On a terminal (``bar`` None: ``out.isatty()``) a tqdm bar on ``out`` with the step's own figures
    (step of N, seconds per step, time left); otherwise a plain line ``  <what>: epoch 3/10, step
    540 of 2,010, 0.41 s/step, about 10 min left`` once the pace is known, then at most every
    ``every`` seconds; :meth:`finish`, once the step ended, shows its last state when no line
    did (a short step's pace). A file written before ``since`` (a ``time.time()`` value: an
    earlier attempt's) is ignored. :meth:`close` removes the bar."""

    def __init__(self, what, path, since, out=None, bar=None, every=30.0, clock=time.monotonic):
        self.what, self.path, self.since, self.every, self.clock = what, path, since, every, clock
        self.out = out if out is not None else sys.stdout
        self.bar = _isatty(self.out) if bar is None else bool(bar)
        self.lines = 0  # plain lines printed
        self._bar = None
        self._updated = None
        self._last_line = None

    def poll(self, last=False):
        doc = read_progress(self.path, since=self.since)
        if doc is None or doc.get("updated") == self._updated:
            return
        self._updated = doc.get("updated")
        if self.bar:
            self._show_bar(doc)
        else:
            self._show_line(doc, last)

    def finish(self):
        """The step ended: its last state, in a plain line when none was shown yet."""
        self.poll(last=self.lines == 0)

    def _show_line(self, doc, last=False):
        now = self.clock()
        if not last and self._last_line is None and doc.get("s_per_step") is None and doc.get("state") == "running":
            return  # the first line waits for the pace
        if not last and self._last_line is not None and now - self._last_line < self.every:
            return
        self._last_line = now
        self.lines += 1
        print(f"  {self.what}: {progress_text(doc, time.time())}", file=self.out, flush=True)

    def _show_bar(self, doc):
        if self._bar is None:
            self._bar = tqdm(total=doc["total"], initial=doc["done"], desc=f"  {self.what}", file=self.out,
                             leave=False, dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        self._bar.total = doc["total"]
        self._bar.n = doc["done"]
        self._bar.set_postfix_str(progress_text(doc, time.time()), refresh=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
