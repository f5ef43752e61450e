"""bloom_jax.storage against a real GCS server (fake-gcs-server, tests/helpers/gcs.py) and a local directory: the
same calls give the same answers in both; writes are whole or absent; GCS's 429 and 503 answers are retried
with backoff, and what cannot be retried (403, a missing bucket, a stopped server) is one line naming the URL."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from gcs import Rule, requests_to

from bloom_jax import storage
from bloom_jax.errors import BloomJaxError


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path) -> str:
    """An empty place to write: a local directory, or a prefix in a new bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return storage.join(request.getfixturevalue("bucket"), "root")


def test_files_read_write_list_and_remove_alike_in_a_directory_and_a_bucket(root):
    for key, data in (("a.txt", b"alpha"), ("sub/b.jsonl", b"{}\n"), ("sub/deeper/c.txt", b"c"), ("d.bin", b"")):
        storage.write_bytes(storage.join(root, key), data)
    assert storage.read_bytes(storage.join(root, "a.txt")) == b"alpha"
    assert storage.read_bytes(storage.join(root, "missing")) is None
    assert storage.is_file(storage.join(root, "a.txt")) and not storage.is_file(storage.join(root, "sub"))
    assert storage.is_dir(storage.join(root, "sub")) and not storage.is_dir(storage.join(root, "a.txt"))
    assert storage.exists(root) and not storage.exists(storage.join(root, "nothing"))
    assert storage.list_names(root) == ["a.txt", "d.bin", "sub"]
    assert storage.find(root) == ["a.txt", "d.bin", "sub/b.jsonl", "sub/deeper/c.txt"]
    assert storage.glob(storage.join(root, "*.txt")) == [storage.join(root, "a.txt")]
    assert storage.glob(storage.join(root, "**", "*.txt")) == [storage.join(root, "a.txt"),
                                                              storage.join(root, "sub", "deeper", "c.txt")]
    assert storage.size_and_version(storage.join(root, "a.txt"))[0] == 5
    storage.write_bytes(storage.join(root, "a.txt"), b"alpha, again")  # a rewrite changes the version
    assert storage.read_range(storage.join(root, "a.txt"), 7, 12) == b"again"
    assert storage.read_ranges(storage.join(root, "a.txt"), [(0, 5), (7, 12), (3, 3)]) == [b"alpha", b"again", b""]

    storage.move_tree(storage.join(root, "sub"), storage.join(root, "moved"))
    assert storage.find(root) == ["a.txt", "d.bin", "moved/b.jsonl", "moved/deeper/c.txt"]
    storage.remove(storage.join(root, "a.txt"))
    storage.remove(storage.join(root, "a.txt"))  # absent: nothing to do
    storage.remove_tree(storage.join(root, "moved"))
    assert storage.find(root) == ["d.bin"]


def test_a_rewritten_file_has_a_new_version(root):
    path = storage.join(root, "f")
    storage.write_bytes(path, b"one")
    before = storage.size_and_version(path)
    time.sleep(0.01)  # a local mtime's resolution
    storage.write_bytes(path, b"two")
    after = storage.size_and_version(path)
    assert before[0] == after[0] == 3 and before[1] != after[1]


def test_a_streamed_write_that_fails_leaves_nothing_and_one_that_ends_leaves_all(root, bucket):
    url = storage.join(bucket, "streamed.bin")
    data = np.random.default_rng(0).integers(0, 255, 12 * 2**20, np.uint8).tobytes()  # parts of 5 MiB and more
    with pytest.raises(RuntimeError, match="half-way"):
        with storage.open_write(url) as f:
            f.write(data[: 6 * 2**20])
            raise RuntimeError("half-way")
    assert storage.read_bytes(url) is None and not storage.exists(url)
    with storage.open_write(url) as f:
        for start in range(0, len(data), 2**20):
            f.write(data[start:start + 2**20])
    assert storage.read_bytes(url) == data
    with storage.open_read(url) as f:
        f.seek(len(data) - 10)
        assert f.read() == data[-10:]


def test_an_appended_file_in_a_bucket_is_uploaded_whole_at_each_flush(bucket):
    url = storage.join(bucket, "run", "metrics.jsonl")
    storage.write_bytes(url, b'{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4')  # a line cut short by a kill
    file = storage.AppendedFile(url, interval_s=3600, keep_line=lambda line: b'"step": 3' not in line
                                and line.endswith(b"\n"))
    assert file.dropped == 2 and storage.read_bytes(url) == b'{"step": 1}\n{"step": 2}\n'
    file.append(b'{"step": 3}\n')  # the first upload of this writer goes at once
    assert storage.read_bytes(url).endswith(b'{"step": 3}\n')
    file.append(b'{"step": 4}\n')  # within the interval: held
    assert not storage.read_bytes(url).endswith(b'{"step": 4}\n')
    file.flush(force=True)
    assert storage.read_bytes(url) == b'{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n'
    file.append(b'{"step": 5}\n')
    file.close()
    assert storage.read_bytes(url).endswith(b'{"step": 5}\n')


@pytest.mark.slow  # the backoff: about 12 s
def test_429_and_503_are_retried_with_backoff(gcs, bucket):
    # Two refusals of each kind, then the server answers: the write lands, after gcsfs's backoff (1 s, then 2 s,
    # with up to 1 s of jitter each) and TensorStore's (the same policy: 1 s, 2 s).
    for status in (429, 503):
        rule = gcs.proxy.add(Rule(requests_to("POST|PUT"), status=status, times=2))
        start = time.monotonic()
        storage.write_bytes(storage.join(bucket, f"after-{status}"), b"landed")
        assert rule.hits == 2 and time.monotonic() - start >= 3
        assert storage.read_bytes(storage.join(bucket, f"after-{status}")) == b"landed"
    import tensorstore as ts

    rule = gcs.proxy.add(Rule(requests_to("POST|PUT"), status=503, times=2))
    store = ts.KvStore.open(storage.kvstore_url(bucket), context=storage.tensorstore_context()).result()
    store.write("array-chunk", b"bytes").result()
    assert rule.hits == 2 and storage.read_bytes(storage.join(bucket, "array-chunk")) == b"bytes"


@pytest.mark.slow  # the full backoff, 6 tries over about 33 s
def test_a_server_that_keeps_answering_503_is_one_line_after_its_retries(gcs, bucket):
    gcs.proxy.add(Rule(requests_to("POST|PUT"), status=503))
    start = time.monotonic()
    with pytest.raises(BloomJaxError) as raised:
        storage.write_bytes(storage.join(bucket, "x"), b"never")
    assert str(raised.value) == (f"cannot write {bucket}/x: the server answered 503 Service Unavailable to every "
                                 "try (6 tries, 1 s to 16 s apart)")
    assert 31 <= time.monotonic() - start < 60


def test_a_denied_write_and_a_missing_bucket_are_one_line_at_once(gcs, bucket):
    gcs.proxy.add(Rule(requests_to("POST|PUT|PATCH|DELETE"), status=403))
    start = time.monotonic()
    with pytest.raises(BloomJaxError) as raised:
        storage.check_writable(storage.join(bucket, "run"))
    assert str(raised.value) == f"cannot write {bucket}/run: permission denied (HTTP 403)"
    with pytest.raises(BloomJaxError) as raised:
        storage.check_writable("gs://no-such-bucket-here/run")
    assert str(raised.value) == "cannot write gs://no-such-bucket-here/run: there is no bucket no-such-bucket-here"
    assert time.monotonic() - start < 5  # neither is retried


def test_wire_errors_are_named_as_tensorstore_and_gcsfs_raise_them(gcs, bucket):
    import tensorstore as ts

    gcs.proxy.add(Rule(requests_to("POST|PUT"), status=403))
    store = ts.KvStore.open(storage.kvstore_url(bucket), context=storage.tensorstore_context()).result()
    with pytest.raises(Exception) as raised:
        store.write("k", b"v").result()
    assert storage.wire_error(raised.value) == "permission denied (HTTP 403)"
    assert storage.wire_error(ValueError("an error of something else")) is None
    assert storage.wire_error(FileNotFoundError("/a/local/file")) is None
    gcs.proxy.clear()
    gcs.stop()
    context = storage.tensorstore_context()
    with pytest.raises(Exception) as raised:  # TensorStore's retries: 6 tries, first delay 1 s, here cut to 2
        ts.KvStore.open({"driver": "gcs", "bucket": storage.bucket_of(bucket),
                         "context": {"gcs_request_retries": {"max_retries": 2, "initial_delay": "0.01s"}}},
                        context=context).result().write("k", b"v").result()
    assert re.fullmatch(r"the server could not be reached: .+ \(6 tries, 1 s to 16 s apart\)",
                        storage.wire_error(raised.value)), raised.value


def test_locations(tmp_path):
    assert storage.is_remote("gs://b/x") and storage.is_url("file:///x") and not storage.is_remote("file:///x")
    assert storage.local_path("file:///a/b") == storage.local_path("/a/b")
    assert storage.normalize("gs://b/run/") == "gs://b/run"
    assert storage.normalize(f"file://{tmp_path}/r") == str(tmp_path / "r")
    assert storage.join("gs://b/", "x", "y") == "gs://b/x/y" and storage.bucket_of("gs://b/x/y") == "b"
    assert storage.kvstore_url("gs://b/x") == "gs://b/x/" and storage.kvstore_url("/a") == "file:///a/"
