"""TensorBoard event files: read back what tensorboardX wrote, and drop a resumed run's redone
scalars, checked against files tensorboardX writes with only the kept scalars."""
import os
import struct

from common.tb_events import prune_events, read_records, scalars


def write_events(logdir, points):
    from tensorboardX import SummaryWriter

    w = SummaryWriter(str(logdir))
    for tag, step, value in points:
        w.add_scalar(tag, value, step)
    w.close()
    files = [f for f in os.listdir(logdir) if f.startswith("events.out.tfevents.")]
    assert len(files) == 1
    return os.path.join(logdir, files[0])


POINTS = ([("train/loss", s, 1.0 / (s + 1)) for s in range(10)]
          + [("eval/auroc", e, 0.5 + 0.1 * e) for e in range(4)])


def keep(tag, x):  # the trainer's rule: train/* by step, the rest by epoch
    return x <= (5 if tag.startswith("train/") else 1)


def as_float32(points):
    return [(t, s, struct.unpack("<f", struct.pack("<f", v))[0]) for t, s, v in points]


def test_scalars_reads_back_what_tensorboardx_wrote(tmp_path):
    path = write_events(tmp_path, POINTS)
    assert scalars(path) == as_float32(POINTS)
    records, torn = read_records(path)
    assert not torn and len(records) == len(POINTS) + 1  # + the file-version event


def test_prune_keeps_what_a_file_of_only_the_kept_scalars_holds(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "kept").mkdir()
    path = write_events(tmp_path / "full", POINTS)
    expected = write_events(tmp_path / "kept", [p for p in POINTS if keep(p[0], p[1])])
    assert prune_events(str(tmp_path / "full"), keep) == 4 + 2  # train steps 6..9, eval epochs 2, 3
    assert os.listdir(tmp_path / "full") == [os.path.basename(path)]  # the same file, rewritten in place
    assert scalars(path) == scalars(expected)
    assert read_records(path)[1] is False
    assert prune_events(str(tmp_path / "full"), keep) == 0  # nothing more to drop


def test_a_torn_last_record_is_cut_and_the_rest_kept(tmp_path):
    path = write_events(tmp_path, POINTS)
    size = os.path.getsize(path)
    os.truncate(path, size - 5)  # a run killed while writing its last record
    records, torn = read_records(path)
    assert torn and len(records) == len(POINTS)  # the last scalar is gone, the rest intact
    assert prune_events(str(tmp_path), lambda tag, x: True) == 0
    assert read_records(path) == (records, False)
    assert scalars(path) == as_float32(POINTS[:-1])


def test_a_corrupt_record_ends_the_readable_part(tmp_path):
    path = write_events(tmp_path, POINTS)
    data = bytearray(open(path, "rb").read())
    first = read_records(path)[0][0]
    data[12 + len(first) + 4 + 12 + 3] ^= 0xFF  # a payload byte of the second record
    open(path, "wb").write(bytes(data))
    records, torn = read_records(path)
    assert torn and records == [first]


def test_logger_prunes_before_a_resumed_run_appends(tmp_path):
    """(Both loggers open their files within a second: the second must not empty the first's.)"""
    from common.run_folder import rewind_records
    from utils import Logger

    log = Logger(str(tmp_path))
    for tag, step, value in POINTS:
        log.scalar(tag, value, step)
    log.close()
    rewound = rewind_records(str(tmp_path), keep)  # the resumed run
    assert rewound.events == 6 and rewound.rows == 6
    log = Logger(str(tmp_path))
    for tag, step, value in POINTS:
        if not keep(tag, step):
            log.scalar(tag, value + 1, step)  # redone, with other values
    log.close()
    got = []
    for name in sorted(os.listdir(tmp_path)):
        if name.startswith("events.out.tfevents."):
            got += scalars(os.path.join(tmp_path, name))
    redone = [(t, s, v + 1) for t, s, v in POINTS if not keep(t, s)]
    assert sorted(got) == sorted(as_float32([p for p in POINTS if keep(p[0], p[1])] + redone))
