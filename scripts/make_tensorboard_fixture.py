"""Writes tests/fixtures/tensorboard/: an event file written by TensorBoard's own writer (a file-version
event, then scalar summaries at fixed wall times), and what TensorBoard's reader reads back from it, for
tests/tensorboard.rs to compare nibble's writer with, byte for byte.

Run from the repository root with a virtualenv holding tensorboard:
    python scripts/make_tensorboard_fixture.py
"""
import json
import os

import tensorboard
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

OUT = "tests/fixtures/tensorboard"
os.makedirs(OUT, exist_ok=True)
path = os.path.join(OUT, "events.out.tfevents.fixture")
# (wall time, step, tag, value); the values include ones a float32 rounds.
SCALARS = [
    (1700000001.25, 1, "train/loss", 2.5),
    (1700000001.75, 1, "train/learning_rate", 0.0002),
    (1700000002.125, 2, "train/loss", 1.9876543),
    (1700000002.5, 2, "eval/loss", 2.0625),
    (1700000003.0, 300, "train/grad_norm", 12345.678),
]
with open(path, "wb") as f:
    writer = RecordWriter(f)
    writer.write(event_pb2.Event(wall_time=1700000000.5, step=0, file_version="brain.Event:2").SerializeToString())
    for wall, step, tag, value in SCALARS:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        writer.write(event_pb2.Event(wall_time=wall, step=step, summary=summary).SerializeToString())
    writer.flush()

read = []
for event in EventFileLoader(path).Load():
    entry = {"wall_time": event.wall_time, "step": event.step}
    if event.HasField("file_version"):
        entry["file_version"] = event.file_version
    for v in event.summary.value:
        # TensorBoard's loader migrates simple_value to a tensor; float_val holds the float32.
        entry["tag"] = v.tag
        entry["value"] = v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value
    read.append(entry)
with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump({"tensorboard": tensorboard.__version__, "scalars": SCALARS, "read": read}, f, indent=1)
print("wrote", path, os.path.getsize(path), "bytes,", len(read), "events read back")
