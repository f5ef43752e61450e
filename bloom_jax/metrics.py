"""A training run's logged metrics: OUTPUT_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard
scalars (OUTPUT_DIR/tensorboard/events.out.tfevents.*, TFRecords of `Event` protos, one per logged step).

Both are written, and flushed, by the training loop itself. tensorboardX's `SummaryWriter` writes from a thread
of its own: a full disk there is a thread's traceback, and every later scalar is lost without a word. Here a full
or unwritable disk is one `BloomJaxError` naming the file, for the trainer to stop on.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

from bloom_jax.disk_faults import disk_error, write_failure
from bloom_jax.log import get_logger

log = get_logger(__name__)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Appends each logged step's metrics to metrics.jsonl and to a new TensorBoard event file.

    `resume_step`: metrics.jsonl's lines past it are dropped first (a run killed after its last checkpoint
    logged steps that the resumed run logs again). `enabled=False` (every process but the first) writes nothing.
    """

    def __init__(self, output_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._files = []
        if not enabled:
            return
        path = output_dir / METRICS_FILE
        try:
            _drop_lines_past(path, resume_step)
            self._jsonl = self._open(path, "a")
            events = output_dir / TENSORBOARD_DIR / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
            self._events = self._open(events, "ab")
            self._events.write(_record(_event(file_version="brain.Event:2")))
            self._events.flush()
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path, mode: str):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file = open(path, mode)
        except OSError as error:
            raise write_failure(error, path) from None
        self._files.append(file)
        return file

    def write(self, metrics: dict) -> None:
        """Appends one step's metrics (`metrics["step"]` and floats); a full or unwritable disk raises one
        `BloomJaxError` naming the file."""
        if not self.enabled:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        line = json.dumps({**metrics, "time": time.time()}) + "\n"
        scalars = Summary(value=[Summary.Value(tag=key, simple_value=value) for key, value in metrics.items()
                                 if key != "step"])
        for file, data in ((self._jsonl, line), (self._events, _record(_event(step=metrics["step"],
                                                                                summary=scalars)))):
            try:
                file.write(data)
                file.flush()
            except OSError as error:
                raise write_failure(error, Path(file.name)) from None

    def close(self) -> None:
        """Closes the files; what a full disk kept them from flushing was reported by `write`."""
        for file in self._files:
            try:
                file.close()
            except OSError as error:
                if disk_error(error) is None:
                    raise
        self._files = []


def _drop_lines_past(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) < len(lines):
        staged = path.with_name(path.name + ".tmp")
        try:
            staged.write_text("".join(kept))
            os.replace(staged, path)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        log.info(f"{path.name}: dropped {len(lines) - len(kept)} steps logged after step {step}, the checkpoint "
                 "this run resumes from")


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; a line cut short by a kill counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _event(**fields):
    from tensorboardX.proto.event_pb2 import Event

    return Event(wall_time=time.time(), **fields)


def _record(event) -> bytes:
    """`event` framed as a TFRecord: length, its masked CRC-32C, the bytes, theirs."""
    from tensorboardX.record_writer import masked_crc32c

    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))
