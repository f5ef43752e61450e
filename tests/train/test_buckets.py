"""Training runs that live in a bucket (a real GCS server, tests/helpers/gcs.py): output, data and token cache at
gs:// URLs. A run SIGKILLed on one machine resumes on a fresh one from the bucket alone and ends where run A
(conftest.py, all local) ended, bit for bit; a server stopped mid-save stops the run with one line and the rerun
resumes; two processes share a bucket, process 0 alone writing its shared files; a LoRA run's adapter is exported
from and to the bucket; a missing bucket or a denied write is one line before any work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from commands import error_line, free_port, run_cli
from faults import cli, kill, stopped
from flax.traverse_util import flatten_dict
from gcs import FaultProxy, Rule, requests_to
from runs import RECIPE, two_processes, without_timing

from bloom_jax import from_pretrained, storage

# In an object store Orbax commits a save by writing commit_success.txt, twice a step (its item, then the step):
# the third call is step 16's first.
GCS_COMMIT = "orbax.checkpoint._src.path.atomicity:CommitFileTemporaryPath.finalize"


def upload_data(bucket: str) -> str:
    """Run A's training files (json/*.py of this Python) copied to BUCKET/data/; returns the glob naming them."""
    for path in sorted(Path(json.__file__).parent.glob("*.py")):
        storage.write_bytes(storage.join(bucket, "data", path.name), path.read_bytes())
    return storage.join(bucket, "data", "*.py")


def bucket_metrics(output_dir: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(storage.join(output_dir, "metrics.jsonl")).splitlines()]


def committed_steps(output_dir: str) -> list[int]:
    """The steps of a run's checkpoints that Orbax marked complete."""
    checkpoints = storage.join(output_dir, "checkpoints")
    return sorted(int(name) for name in storage.list_names(checkpoints)
                  if name.isdigit() and storage.is_file(storage.join(checkpoints, name, "commit_success.txt")))


def same_weights(a: str | Path, b: str | Path) -> bool:
    ours, ref = (flatten_dict(from_pretrained(where)[1]) for where in (a, b))
    return ours.keys() == ref.keys() and all(np.array_equal(np.asarray(ours[k]), np.asarray(ref[k])) for k in ours)


@pytest.mark.slow
def test_a_run_in_a_bucket_killed_resumes_on_a_fresh_machine_from_the_bucket_alone(run_a, bucket, tmp_path):
    # Output, data and token cache in the bucket; the tokenizer trained by the run itself (saved there too).
    # SIGKILL while step 16's checkpoint is being committed: it has its data but no commit mark.
    a_dir, _ = run_a
    output_dir = storage.join(bucket, "run")
    recipe = {**RECIPE, "train_data": [upload_data(bucket)], "output_dir": output_dir}
    first = tmp_path / "machine-1"
    first.mkdir()
    (first / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    kill(stopped(first, 3, GCS_COMMIT, "train", str(first / "recipe.yaml")))
    assert committed_steps(output_dir) == [8]
    assert storage.find(storage.join(output_dir, "checkpoints", "16"))  # the uncommitted save's data
    assert storage.is_file(storage.join(output_dir, "tokenizer.json"))
    assert len([n for n in storage.list_names(storage.join(output_dir, "data-cache")) if n.endswith(".json")]) == 1

    # A new machine: an empty directory, home and temporary directory; the recipe its only local file.
    second = tmp_path / "machine-2"
    for name in ("home", "tmp"):
        (second / name).mkdir(parents=True)
    (second / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = cli("train", "recipe.yaml", cwd=second,
                         env={"HOME": str(second / "home"), "TMPDIR": str(second / "tmp")})
    assert code == 0, err[-3000:]
    assert "resuming from step 8" in err and "tokenizing" not in err  # the cache in the bucket was read
    assert committed_steps(output_dir) == [8, 16, 24]
    ours, ref = bucket_metrics(output_dir), [json.loads(line) for line in (a_dir / "metrics.jsonl").open()]
    assert [m["step"] for m in ours] == list(range(1, 25))
    assert without_timing(ours) == without_timing(ref)
    assert same_weights(storage.join(output_dir, "final"), a_dir / "final")
    assert sorted(os.listdir(second)) == ["home", "recipe.yaml", "tmp"]  # nothing of the run is local


@pytest.mark.slow
def test_a_server_stopped_mid_save_stops_the_run_with_one_line_and_the_rerun_resumes(run_a, recipe_file, gcs,
                                                                                      bucket):
    # The server dies at the first request of step 16's save. The run's next write of it (the save, or the
    # metrics it uploads with each checkpoint) fails after its retries: one line naming the URL and the last good
    # checkpoint. The server comes back with its data (a restart); the rerun resumes from step 8 and ends as run A.
    a_dir, _ = run_a
    output_dir = storage.join(bucket, "run")
    overrides = [f"output_dir={output_dir}", f"tokenizer={a_dir}", f"data_cache={a_dir / 'data-cache'}"]
    gcs.proxy.add(Rule(requests_to(path="run/checkpoints/16"), times=1, action=gcs.stop))
    code, out, err = cli("train", recipe_file, *overrides)
    assert code == 2 and out == "" and "Traceback" not in err, err[-3000:]
    assert re.fullmatch(rf"bloom-jax: error: cannot (save a checkpoint in|write) {re.escape(output_dir)}\S*: the "
                        r"server could not be reached: .+ \(6 tries, 1 s to 16 s apart\); the last good checkpoint, step 8, "
                        "is kept", err.strip().splitlines()[-1]), err[-2000:]
    gcs.start()
    assert committed_steps(output_dir) == [8]
    code, out, err = run_cli("train", recipe_file, *overrides)
    assert code == 0 and "resuming from step 8" in err, err[-3000:]
    assert committed_steps(output_dir) == [8, 16, 24]
    ref = [json.loads(line) for line in (a_dir / "metrics.jsonl").open()]
    assert without_timing(bucket_metrics(output_dir)) == without_timing(ref)


@pytest.mark.slow
def test_two_processes_share_a_bucket_process_0_writing_what_they_share(run_a, recipe_file, gcs, bucket):
    """2 processes x 4 CPU devices, output, data and token cache in the bucket: process 0 tokenizes and writes
    the cache, the tokenizer, the metrics and final/'s files; process 1 writes only its own shards of the
    checkpoints and of final/, and reads its rows of the token cache by byte ranges. The losses are run A's."""
    a_dir, _ = run_a
    output_dir = storage.join(bucket, "run")
    overrides = [f"output_dir={output_dir}", f"train_data=[{upload_data(bucket)}]", "steps=8"]
    second = FaultProxy(f"127.0.0.1:{gcs.server_port}", free_port())  # process 1's own way in, to see its requests
    second.start()
    address = f"http://127.0.0.1:{second.port}"
    try:
        two_processes(recipe_file, overrides, env=[{}, {"STORAGE_EMULATOR_HOST": address,
                                                       "TENSORSTORE_GCS_HTTP_URL": address}])
    finally:
        second.stop()
    # Steps 1 to 5 share run A's learning rates (warmup, 4 steps); from step 6 the shorter run decays sooner.
    reference = [json.loads(line) for line in (a_dir / "metrics.jsonl").open()]
    for ours, ref in zip(bucket_metrics(output_dir)[:5], reference):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert committed_steps(output_dir) == [8] and storage.is_file(storage.join(output_dir, "final", "config.json"))

    run = output_dir.split("://", 1)[1].split("/", 1)[1]
    writes = [path for method, path, _ in second.seen if method in ("POST", "PUT", "PATCH", "DELETE")]
    shared = [path for path in writes if not re.search(rf"{run}/(checkpoints/\d+|final/params)/", path)]
    assert writes and not shared, shared
    token_reads = [(path, byte_range) for method, path, byte_range in second.seen  # reads of content, not metadata
                   if method == "GET" and ".tokens.npy" in path and "alt=media" in path]
    assert token_reads and all(byte_range for _, byte_range in token_reads), token_reads


@pytest.mark.slow
def test_a_lora_run_in_a_bucket_and_its_adapter_exported_from_and_to_it(run_a, recipe_file, bucket, tmp_path):
    a_dir, _ = run_a
    base = storage.join(bucket, "base")
    for key in storage.find(a_dir / "final"):
        storage.write_bytes(storage.join(base, key), (a_dir / "final" / key).read_bytes())
    output_dir = storage.join(bucket, "lora")
    code, out, err = run_cli("train", recipe_file, f"init_from={base}", f"output_dir={output_dir}",
                             "train_data=['{python_stdlib}/email/mime/*.py']", "lora.rank=4", "lora.alpha=8",
                             "lora.base=float32", "steps=8", "save_every=8", "eval_every=8", "learning_rate=3e-2",
                             "warmup_steps=2")
    assert code == 0, err[-3000:]
    final = storage.join(output_dir, "final")
    assert json.loads(storage.read_bytes(storage.join(final, "adapter_config.json")))["base_model_name_or_path"] \
        == base
    exported = storage.join(bucket, "exported")
    code, out, err = run_cli("export-adapter", output_dir, exported)
    assert code == 0 and json.loads(out)["step"] == 8, err
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # the newest checkpoint is the final one
        assert storage.read_bytes(storage.join(exported, name)) == storage.read_bytes(storage.join(final, name))

    local = tmp_path / "adapter"
    local.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (local / name).write_bytes(storage.read_bytes(storage.join(exported, name)))
    generated = [run_cli("generate", where_base, "--adapter", where_adapter, "--prompt", "import os",
                         "--max-new-tokens", 6, "--json")
                 for where_base, where_adapter in ((base, exported), (a_dir / "final", local))]
    assert [code for code, _, _ in generated] == [0, 0], generated[0][2][-2000:]
    assert generated[0][1] == generated[1][1]


def test_a_run_into_a_missing_bucket_or_a_denied_one_is_one_line_before_any_work(recipe_file, gcs, bucket):
    code, out, err = run_cli("train", recipe_file, "output_dir=gs://no-such-bucket-here/run")
    assert code == 2 and error_line(err) == ("bloom-jax: error: cannot write gs://no-such-bucket-here/run: there is "
                                             "no bucket no-such-bucket-here")
    gcs.proxy.add(Rule(requests_to("POST|PUT|PATCH|DELETE"), status=403))
    code, out, err = run_cli("train", recipe_file, f"output_dir={bucket}/run")
    assert code == 2 and error_line(err) == f"bloom-jax: error: cannot write {bucket}/run: permission denied (HTTP 403)"
    assert storage.find(bucket) == []


def test_eval_reads_its_data_from_a_bucket_as_from_a_directory(run_a, bucket):
    a_dir, _ = run_a
    results = [run_cli("eval", a_dir / "final", "--data", data, "--seq-len", 32, "--max-batches", 2)
               for data in (str(Path(json.__file__).parent / "*.py"), upload_data(bucket))]
    assert [code for code, _, _ in results] == [0, 0], results[1][2][-2000:]
    assert json.loads(results[0][1]) == json.loads(results[1][1])


def test_the_pod_launcher_writes_the_run_to_a_bucket(tmp_path):
    launcher = Path(__file__).resolve().parents[2] / "scripts" / "launch_tpu_pod.py"
    base = [sys.executable, str(launcher), "--tpu", "pod", "--zone", "z", "--package", "pkg", "--recipe", "r.yaml",
            "--dry-run"]
    done = subprocess.run([*base, "--bucket", "gs://b", "steps=5"], capture_output=True, text=True)
    assert done.returncode == 0 and "bloom-jax train r.yaml output_dir=gs://b/runs/pod steps=5 --multihost" in \
        done.stdout
    done = subprocess.run(base, capture_output=True, text=True)
    assert done.returncode == 2 and "--bucket gs://BUCKET is needed" in done.stderr


def test_a_recipe_in_a_bucket_reads_as_a_local_one(recipe_file, bucket):
    from bloom_jax.errors import BloomJaxError
    from bloom_jax.recipe import TrainConfig

    url = storage.join(bucket, "recipe.yaml")
    storage.write_bytes(url, recipe_file.read_bytes())
    assert TrainConfig.from_yaml(url, ["steps=3"]) == TrainConfig.from_yaml(recipe_file, ["steps=3"])
    with pytest.raises(BloomJaxError, match=f"cannot read {bucket}/nope.yaml: no such file"):
        TrainConfig.from_yaml(storage.join(bucket, "nope.yaml"))
