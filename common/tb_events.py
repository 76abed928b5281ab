"""Read TensorBoard event files and drop the scalars a resumed run redoes.

An event file is a sequence of records: an 8-byte little-endian length, the masked CRC-32C of
those 8 bytes, the payload (an ``Event`` protocol buffer), the masked CRC-32C of the payload.
tensorboardX writes them and reads none back, so the reading lives here (a dozen lines on
tensorboardX's own protocol buffers; the ``tensorboard`` package, installed to look at the
files, is not needed to rewrite them).

When a run resumes from a checkpoint, the interrupted attempt has already logged scalars past
that point; the resumed run logs them again. :func:`prune_events` rewrites each event file of
the run folder without the scalars ``keep(tag, step)`` rejects (the same rule as the rows of
``scalars.csv``), atomically, so TensorBoard shows every step once.
"""
import glob
import os
import struct

from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from utils import atomic_write


def _masked_crc(data):
    return masked_crc32c(data)


def read_records(path):
    """The payloads of the complete, intact records of an event file, in order, and whether the
    file ended in a partial or corrupt record (a run killed while writing)."""
    with open(path, "rb") as fh:
        data = fh.read()
    records, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            return records, True
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        end = pos + 12 + length + 4
        if header_crc != _masked_crc(header) or end > len(data):
            return records, True
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[end - 4:end])
        if payload_crc != _masked_crc(payload):
            return records, True
        records.append(payload)
        pos = end
    return records, False


def encode_record(payload):
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", _masked_crc(header)) + payload + struct.pack("<I", _masked_crc(payload))


def scalars(path):
    """``[(tag, step, value), ...]`` of the scalar summaries in an event file, in file order."""
    out = []
    for payload in read_records(path)[0]:
        event = Event.FromString(payload)
        if event.HasField("summary"):
            out.extend((v.tag, int(event.step), float(v.simple_value)) for v in event.summary.value
                       if v.HasField("simple_value"))
    return out


def prune_events(logdir, keep):
    """Rewrite the event files directly in ``logdir`` without the summaries whose ``(tag, step)``
    ``keep`` rejects, and without a partial last record. Returns the number of scalar values
    dropped. A file with nothing to drop is left as it is; a rewritten one is replaced
    atomically (written beside it, then renamed over it)."""
    dropped = 0
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        if not os.path.isfile(path):
            continue
        records, torn = read_records(path)
        kept, gone = [], 0
        for payload in records:
            event = Event.FromString(payload)
            if event.HasField("summary") and event.summary.value:
                values = [v for v in event.summary.value if keep(v.tag, int(event.step))]
                gone += len(event.summary.value) - len(values)
                if not values:
                    continue
                if len(values) != len(event.summary.value):
                    del event.summary.value[:]
                    event.summary.value.extend(values)
                    payload = event.SerializeToString()
            kept.append(payload)
        if gone or torn:
            blob = b"".join(encode_record(p) for p in kept)
            atomic_write(path, lambda fh: fh.write(blob))
        dropped += gone
    return dropped
