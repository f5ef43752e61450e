"""A training run's logged metrics: OUTPUT_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard
scalars (OUTPUT_DIR/tensorboard/events.out.tfevents.*, TFRecords of `Event` protos, one per logged step).

Both are written, and flushed, by the training loop itself. tensorboardX's `SummaryWriter` writes from a thread
of its own: a full disk there is a thread's traceback, and every later scalar is lost without a word. Here a full
or unwritable disk is one `BloomJaxError` naming the file, for the trainer to stop on.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from pathlib import Path

from bloom_jax.disk_faults import disk_error, write_failure
from bloom_jax.errors import BloomJaxError
from bloom_jax.log import get_logger
from bloom_jax.storage import AppendedFile, Location, join

log = get_logger(__name__)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Appends each logged step's metrics to metrics.jsonl and to a new TensorBoard event file, in a local
    OUTPUT_DIR or one at a URL (`gs://...`: there each file is uploaded again at most every 30 s, and by `flush`,
    which the trainer calls at each checkpoint so that every step it covers is logged in the bucket).

    `resume_step`: metrics.jsonl's lines past it are dropped first (a run killed after its last checkpoint
    logged steps that the resumed run logs again). `enabled=False` (every process but the first) writes nothing.
    """

    def __init__(self, output_dir: Location, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._files: list[AppendedFile] = []
        if not enabled:
            return
        try:
            self._jsonl = self._open(join(output_dir, METRICS_FILE),
                                     keep_line=lambda line: _logged_step(line) <= resume_step)
            if self._jsonl.dropped:
                log.info(f"{METRICS_FILE}: dropped {self._jsonl.dropped} steps logged after step {resume_step}, the "
                         "checkpoint this run resumes from")
            events = join(output_dir, TENSORBOARD_DIR,
                          f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
            self._events = self._open(events)
            self._append(self._events, _record(_event(file_version="brain.Event:2")))
        except BaseException:
            self.close()
            raise

    def _open(self, location: str, keep_line=None) -> AppendedFile:
        try:
            file = AppendedFile(location, keep_line=keep_line)
        except OSError as error:
            raise write_failure(error, Path(location)) from None
        self._files.append(file)
        return file

    @staticmethod
    def _append(file: AppendedFile, data: bytes) -> None:
        try:
            file.append(data)
        except OSError as error:
            raise write_failure(error, Path(file.location)) from None

    def write(self, metrics: dict) -> None:
        """Appends one step's metrics (`metrics["step"]` and floats); a full or unwritable disk, or a fault on
        the wire, raises one `BloomJaxError` naming the file."""
        if not self.enabled:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        line = json.dumps({**metrics, "time": time.time()}) + "\n"
        scalars = Summary(value=[Summary.Value(tag=key, simple_value=value) for key, value in metrics.items()
                                 if key != "step"])
        self._append(self._jsonl, line.encode())
        self._append(self._events, _record(_event(step=metrics["step"], summary=scalars)))

    def flush(self) -> None:
        """Uploads what an object store has not received yet (a no-op for local files, written at once)."""
        for file in self._files:
            file.flush(force=True)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(BloomJaxError, OSError):  # the error in flight is the one reported
            self.close()

    def close(self) -> None:
        """Closes the files (uploading what is left); what a full disk kept them from flushing was reported by
        `write`."""
        files, self._files = self._files, []
        for file in files:
            try:
                file.close()
            except OSError as error:
                if disk_error(error) is None:
                    raise


def _logged_step(line: bytes) -> float:
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
