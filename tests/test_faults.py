"""Real faults, not mocks: a conversion or export SIGKILLed at several points and rerun, two writers of one
destination at once, Ctrl-C and SIGTERM, a full disk (a small tmpfs), a read-only one and a directory without
write permission (`chmod`, for a child that root's overrides do not help: helpers/unprivileged.py). Each checks
the exit status, the message, what is left on disk, and that the rerun gives the bytes of a run without the fault.
(The trainer's faults are in train/test_faults.py, the token cache's in test_data.py.)"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
from pathlib import Path

import pytest
from faults import cli, in_child, kill, signalled, stopped, tmpfs

from bloom_jax import BloomJaxError
from bloom_jax.checkpoints import convert, export
from bloom_jax.cli import main

pytestmark = pytest.mark.slow  # real faults: child processes, kills and reruns (.ci/run runs them)

# The only bytes two clean conversions differ in: Orbax's commit timestamps.
TIMESTAMPED = {"params/_CHECKPOINT_METADATA"}
READ_TENSOR = "bloom_jax.checkpoints.hf_files:WeightFiles.read"  # convert reads a source tensor
READ_PARAM = "bloom_jax.checkpoints.converted:StoredParams.read"  # export reads a stored parameter


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("faults") / "model"
    shutil.copytree(tiny.checkpoint.directory, directory)
    return directory


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory) -> dict[str, Path]:
    """A conversion and an export of `source` that nothing interrupted."""
    root = tmp_path_factory.mktemp("clean")
    convert(source, root / "converted", progress=False)
    export(root / "converted", root / "exported", progress=False)
    return {"converted": root / "converted", "exported": root / "exported"}


def digests(directory: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        key = str(path.relative_to(directory))
        data = path.read_bytes()
        if key in TIMESTAMPED:
            data = json.dumps({k: v for k, v in json.loads(data).items() if "timestamp" not in k}).encode()
        out[key] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(parent: Path, name: str) -> list[str]:
    """What a writer of `parent / name` may leave beside it: staging directories and its lock."""
    return sorted(p.name for p in parent.glob(f".{name}.*"))


@pytest.mark.parametrize("call", [1, 15, 29], ids=["first_tensor", "midway", "last_tensor"])  # of 29
def test_a_killed_conversion_is_cleaned_up_by_the_rerun(source, clean, tmp_path, capsys, call):
    dst = tmp_path / "out"
    kill(stopped(tmp_path, call, READ_TENSOR, "convert", str(source), str(dst)))
    staged = [p for p in tmp_path.glob(".out.partial-*")]
    assert len(staged) == 1 and any(staged[0].rglob("*"))  # the dead run's staging, with data in it
    assert not dst.exists()  # nothing valid-looking at DST

    assert main(["convert", str(source), str(dst)]) == 0
    assert f"removed {staged[0]}" in capsys.readouterr().err
    assert leftovers(tmp_path, "out") == []
    assert digests(dst) == digests(clean["converted"])


@pytest.mark.parametrize("call", [1, 10], ids=["first_tensor", "midway"])
def test_a_killed_export_is_cleaned_up_by_the_rerun(clean, tmp_path, capsys, call):
    dst = tmp_path / "hf"
    kill(stopped(tmp_path, call, READ_PARAM, "export", str(clean["converted"]), str(dst)))
    assert len(list(tmp_path.glob(".hf.partial-*"))) == 1 and not dst.exists()
    assert main(["export", str(clean["converted"]), str(dst)]) == 0
    assert leftovers(tmp_path, "hf") == []
    assert digests(dst) == digests(clean["exported"])


def test_a_second_writer_of_one_destination_is_refused(source, clean, tmp_path, capsys):
    dst = tmp_path / "out"
    first = stopped(tmp_path, 3, READ_TENSOR, "convert", str(source), str(dst))
    try:
        staged = sorted(tmp_path.glob(".out.partial-*"))
        assert main(["convert", str(source), str(dst)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"bloom-jax: error: another process is writing {dst} (it holds {tmp_path / '.out.lock'}): wait for "
                       "it to finish or stop it"]
        assert sorted(tmp_path.glob(".out.partial-*")) == staged  # the live writer's staging untouched
    finally:
        kill(first)
    assert main(["convert", str(source), str(dst)]) == 0
    assert leftovers(tmp_path, "out") == [] and digests(dst) == digests(clean["converted"])


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "bloom-jax: interrupted"),
                                                (signal.SIGTERM, 143, "bloom-jax: terminated")],
                         ids=["sigint", "sigterm"])
@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_signal_stops_convert_and_export_with_their_staging_removed(source, clean, tmp_path, signum, code, line,
                                                                      command):
    src, target = (source, READ_TENSOR) if command == "convert" else (clean["converted"], READ_PARAM)
    dst = tmp_path / "out"
    child = stopped(tmp_path, 5, target, command, str(src), str(dst))
    assert len(list(tmp_path.glob(".out.partial-*"))) == 1
    status, printed = signalled(child, signum)
    assert status == code and printed.strip().splitlines()[-1] == line
    assert not dst.exists() and leftovers(tmp_path, "out") == []


def test_sigterm_stops_eval_with_nothing_on_stdout(clean, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("The cat sat on the mat. " * 200)
    child = stopped(tmp_path, 1, "bloom_jax.train:evaluate", "eval", str(clean["converted"]), "--data", str(data))
    status, printed = signalled(child, signal.SIGTERM)
    assert status == 143 and printed.strip().splitlines() == ["bloom-jax: terminated"]


# -- full and unwritable disks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_full_disk_is_one_line_naming_what_was_needed_and_leaves_nothing(source, clean, tmp_path, command):
    src = source if command == "convert" else clean["converted"]
    with tmpfs(tmp_path / "disk", "64k") as disk:  # the tiny checkpoint needs about 0.5 MB
        code, out, err = cli(command, src, disk / "out")  # a child: all it prints, up to its exit
        assert code == 2 and out == "" and "Traceback" not in err and "Exception" not in err
        assert re.fullmatch(  # the last line, after the progress bar's
            rf"bloom-jax: error: cannot write {disk / 'out'}: no space left on device in {disk} \(it needs about "
            r"0\.\d MB, 0\.\d MB are free there\)", err.strip().splitlines()[-1]), err
        assert list(disk.iterdir()) == []  # no DST, no staging, no lock


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_read_only_destination_is_one_line_and_leaves_nothing(source, clean, tmp_path, capsys, command):
    src = source if command == "convert" else clean["converted"]
    with tmpfs(tmp_path / "disk", "1m", read_only=True) as disk:
        assert main([command, str(src), str(disk / "out")]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1:] == [
            f"bloom-jax: error: cannot write in {disk}: Read-only file system"]
        assert list(disk.iterdir()) == []


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_destination_without_write_permission_is_one_line_and_leaves_nothing(source, clean, tmp_path, command):
    src = source if command == "convert" else clean["converted"]
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        code, out, err = cli(command, src, locked / "out", unprivileged=True)
    finally:
        locked.chmod(0o755)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"bloom-jax: error: cannot write in {locked}: Permission denied"
    assert list(locked.iterdir()) == []
    assert main([command, str(src), str(locked / "out")]) == 0  # writable again: the bytes of a clean run
    assert digests(locked / "out") == digests(clean[f"{command}ed"])


SAVE_PRETRAINED = """
import sys
from bloom_jax import BloomJaxError
from bloom_jax.checkpoints import from_pretrained, save_pretrained
model, params = from_pretrained(sys.argv[1])
try:
    save_pretrained(params, model.config, sys.argv[2])
except BloomJaxError as error:
    sys.exit(f"error: {error}")
"""


def test_save_pretrained_without_write_permission_raises_one_error_and_leaves_nothing(clean, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        code, _, err = in_child("-c", SAVE_PRETRAINED, clean["converted"], locked / "saved", unprivileged=True)
    finally:
        locked.chmod(0o755)
    assert (code, err.strip().splitlines()[-1]) == (1, f"error: cannot write in {locked}: Permission denied")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_save_pretrained_on_a_full_or_read_only_disk_raises_one_error_and_leaves_nothing(tiny, tmp_path, fault):
    from bloom_jax.checkpoints import save_pretrained

    with tmpfs(tmp_path / "disk", "64k", read_only=fault == "read_only") as disk:
        expected = (f"cannot write {disk / 'saved'}: no space left on device in {disk} (it needs about "
                    if fault == "full" else f"cannot write in {disk}: Read-only file system")
        with pytest.raises(BloomJaxError, match=re.escape(expected)):
            save_pretrained(tiny.params, tiny.model.config, disk / "saved")
        assert list(disk.iterdir()) == []


def test_a_filesystem_without_locks_converts_unlocked_and_leaves_other_staging(source, clean, tmp_path, monkeypatch,
                                                                               caplog):
    # Some FUSE mounts answer flock with ENOLCK: the write goes on, saying what it cannot guard against, and a
    # staging directory it cannot tell from a live writer's is left alone.
    import errno

    from bloom_jax.checkpoints import storage

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(storage.fcntl, "flock", no_locks)
    other = tmp_path / ".out.partial-other"
    other.mkdir()
    with caplog.at_level("WARNING", logger="bloom_jax.checkpoints.storage"):
        convert(source, tmp_path / "out", progress=False)
    assert any("takes no file locks" in r.getMessage() for r in caplog.records)
    assert other.is_dir() and leftovers(tmp_path, "out") == [".out.partial-other"]
    assert digests(tmp_path / "out") == digests(clean["converted"])
