"""A training run's checkpoints, OUTPUT_DIR/checkpoints (a local directory or a URL, `gs://...`): Orbax's
`CheckpointManager` (asynchronous saves every `save_every` steps, the last `keep` kept), the newest checkpoint
that restores (a damaged one named with what is wrong and set aside), and a full or unwritable disk, or a fault
on the wire, reported as one line naming the last good checkpoint.

In an object store Orbax writes a checkpoint in place and marks it complete last (commit_success.txt): one that
a killed run or a stopped server left without the mark is never listed, and Orbax removes it at the next start.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax

from bloom_jax import storage
from bloom_jax.disk_faults import DISK_ERRORS, disk_error, room
from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.log import get_logger
from bloom_jax.storage import FailureEchoesDropped, Location, is_remote, join

log = get_logger(__name__)


class RunCheckpoints:
    """The checkpoints of the run in `output_dir`, of train states shaped like `abstract_state` (shardings
    included). Open with `RunCheckpoints.open`: a save that failed is then reported once, as one line."""

    def __init__(self, output_dir: Location, keep: int, save_every: int, abstract_state: dict,
                 echoes: FailureEchoesDropped):
        self.output_dir, self.directory = output_dir, join(output_dir, "checkpoints")
        self.abstract_state, self.echoes = abstract_state, echoes
        self.manager = self._manager(keep, save_every)

    @classmethod
    @contextlib.contextmanager
    def open(cls, output_dir: Location, keep: int, save_every: int, abstract_state: dict
             ) -> Iterator[RunCheckpoints]:
        """The run's checkpoints while the block runs; closed after it, waiting for the saves in flight."""
        # Orbax and TensorStore report a save that the storage failed many times over, from their threads and
        # when Python collects the save's futures; it is reported once, as one line.
        with FailureEchoesDropped() as echoes:
            checkpoints = cls(output_dir, keep, save_every, abstract_state, echoes)
            try:
                yield checkpoints
            except BaseException:
                # A failing run's error is what it reports; a save that failed with it (the same full disk)
                # would only replace it with Orbax's traceback.
                with contextlib.suppress(Exception):
                    checkpoints.manager.close()
                raise
            with checkpoints.errors_reported():
                checkpoints.manager.close()

    def _manager(self, keep: int, save_every: int):
        ocp = storage.orbax()
        directory = storage.orbax_path(self.directory)
        try:
            return ocp.CheckpointManager(
                directory,
                # should_save_fn rather than save_interval_steps: the latter adds an unwanted save at the first
                # step. A save killed mid-way (SIGKILL, preemption) leaves a `STEP.orbax-checkpoint-tmp-*`
                # directory. Orbax replaces it when the resumed run saves STEP again (tests/train/test_faults.py
                # kills one); with cleanup_tmp_directories it also goes when STEP is never saved again (a changed
                # save_every).
                # Step directories made before save() returns: made in the background, a directory that cannot
                # be made (an unwritable or full disk) left the save's other threads waiting 300 s for its
                # signal, holding the process at exit, and then printing their timeouts.
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, enable_async_checkpointing=True, create=True,
                    cleanup_tmp_directories=True, should_save_fn=lambda step, _: step % save_every == 0,
                    async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))
        except Exception as error:  # noqa: BLE001 - what the storage failed is said in one line, the rest raised
            why = storage.fault(error)
            if why is None:
                raise
            raise BloomJaxError(f"cannot write checkpoints in {self.directory}: {why}") from None

    def restore_or_init(self, fresh: Callable[[], dict]) -> dict:
        """The newest checkpoint that restores, or `fresh()` if there is none. A newer one that does not
        (truncated, a file missing: a preempted copy, a full disk) is named with what is wrong, set aside as
        `STEP.unrestorable` once an older one restores, and the run resumes from that; `BloomJaxError` if none
        restores."""
        ocp = storage.orbax()
        directory, manager = self.directory, self.manager
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            return fresh()
        failed = []
        for step in steps:
            try:
                state = manager.restore(step, args=ocp.args.StandardRestore(self.abstract_state))
            except Exception as error:  # noqa: BLE001 - whatever a damaged checkpoint raises, say it and go on
                why = storage.wire_error(error)
                if why is not None:  # the storage, not the checkpoint: nothing is set aside
                    raise BloomJaxError(f"cannot restore step {step} from {directory}: {why}") from None
                failed.append(f"step {step}: {_restore_failure(directory, step, steps, error)}")
                log.warning(f"checkpoint {failed[-1]}")
                self.echoes.keep()
                continue
            if failed:
                if jax.process_index() == 0:  # the directory is shared: one process renames
                    for bad in steps[: steps.index(step)]:
                        storage.move_tree(join(directory, str(bad)), join(directory, f"{bad}.unrestorable"))
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices("bloom_jax: unrestorable checkpoints set aside")
                manager.reload()
                log.warning(f"resuming from step {step} of {directory}, the newest checkpoint that restores (set "
                            f"aside: {', '.join(f'{bad}.unrestorable' for bad in steps[: steps.index(step)])})")
            else:
                log.info(f"resuming from step {step} of {directory}")
            return state
        raise BloomJaxError(f"no checkpoint in {directory} restores ({'; '.join(failed)}): move them away to start "
                            "over")

    def save(self, step: int, state: dict, force: bool = False) -> None:
        """Starts saving `state` as checkpoint `step` if `step` is a save step (any step with `force`); first
        waits for the previous save."""
        ocp = storage.orbax()
        with self.errors_reported():
            self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def latest_step(self) -> int | None:
        """The newest checkpoint's step (a save in flight included); None before any."""
        return self.manager.latest_step()

    def last_saved(self) -> int | None:
        """The newest checkpoint's step once the saves in flight finished; None if none was saved."""
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def wait(self) -> None:
        """Waits for the saves in flight; `BloomJaxError` if a full or unwritable disk failed one."""
        with self.errors_reported():
            self.manager.wait_until_finished()
            self.manager.check_for_errors()

    @contextlib.contextmanager
    def errors_reported(self) -> Iterator[None]:
        """A full or unwritable disk, or a fault on the wire, that failed an asynchronous save, raised in the
        block (by Orbax, as its background thread met it), becomes one `BloomJaxError`: the failed save's
        temporary directory removed, the last good checkpoint kept. Other errors propagate as they are."""
        try:
            yield
        except Exception as error:
            code = None if is_remote(self.directory) else disk_error(error, where=self.output_dir)
            why = DISK_ERRORS[code] if code is not None else storage.wire_error(error)
            if why is None:
                raise
            raise self._save_failed(why, code) from None

    def _save_failed(self, why: str, code: int | None) -> BloomJaxError:
        self._settle()
        message = f"cannot save a checkpoint in {self.directory}: {why}"
        if code is not None:  # what is free is measured with the failed save's data gone
            needed = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(self.abstract_state))
            message += room(code, needed, Path(self.directory), "a checkpoint")
        return BloomJaxError(f"{message}; {self._kept()}")

    @contextlib.contextmanager
    def stop_on_errors(self) -> Iterator[None]:
        """A `BloomJaxError` raised in the block (a full disk or a fault on the wire met by the metrics, say)
        stops the run: its message and the last good checkpoint, as one line."""
        try:
            yield
        except BloomJaxError as error:
            raise self.stopped(str(error)) from None

    def stopped(self, message: str) -> BloomJaxError:
        """The error that stops a run (a full or unwritable disk, say): `message` and the last good checkpoint."""
        self._settle()
        return BloomJaxError(f"{message}; {self._kept()}")

    def _settle(self) -> None:
        """Waits for the saves in flight and removes the temporary directories of those that failed (in an
        object store, a failed save lacks its completion mark: Orbax removes it at the next start)."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - a save the same disk failed: the caller says what is kept
            pass
        if is_remote(self.directory):
            return
        # Orbax reports a failed save at its first failed write, while TensorStore may still be finishing the
        # others: what they write after a removal is removed in turn, until the directory stays gone for 0.6 s
        # (CI once measured the free space with a gone directory written again: 0.9 MB where 1.x were free).
        gone = 0
        for _ in range(40):
            partials = storage.glob(join(self.directory, "*.orbax-checkpoint-tmp*"))
            gone = 0 if partials else gone + 1
            if gone == 3:
                return
            for partial in partials:
                storage.remove_tree(partial)
            time.sleep(0.2)

    def _kept(self) -> str:
        latest = self.manager.latest_step()
        return f"the last good checkpoint, step {latest}, is kept" if latest is not None else "no checkpoint was saved"


def _restore_failure(directory: str, step: int, steps: list[int], error: BaseException) -> str:
    """What is wrong with checkpoint `step`: the files another checkpoint has and it lacks (Orbax's own error
    would only say that the tree does not match), else Orbax's error (a truncated file: the array and where)."""
    def names(s: int) -> set[str]:  # the fixed names, not OCDBT's content-hashed data files
        return {key for key in storage.find(join(directory, str(s))) if storage.name_of(storage.parent_of(key))
                != "d"}

    others = [s for s in steps if s != step]
    missing = sorted(names(others[0]) - names(step)) if others else []
    if missing:
        return f"{join(directory, str(step))} lacks {', '.join(missing)}"
    seen = set()  # TensorStore's own words on a truncated file sit in the chain, under Orbax's wrappers
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found = re.search(r'Error reading "([^"]+)" in OCDBT database at local file "([^"]+)": (.+)', str(error))
        if found:
            return f"{found[1]} in {found[2]}: {found[3].strip()[:200]}"
        error = error.__cause__ or error.__context__
    return one_line(error)
