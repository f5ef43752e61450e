"""Run `bloom-jax train` on every host of a Cloud TPU pod slice, with the gcloud commands this prints.

    python scripts/launch_tpu_pod.py --tpu my-pod --zone us-east5-a --accelerator v5p-64 \
        --package git+https://YOUR-GIT-HOST/bloom-jax --recipe configs/train/bloom-176b.yaml \
        --bucket gs://my-bucket [key=value ...] [--create] [--spot] [--dry-run]

Steps (each one gcloud command, run on all workers of the slice at once with `--worker=all`):
1. (--create) create the TPU VM slice (`gcloud compute tpus tpu-vm create`, spot or reserved as you choose);
2. install this package from a git URL (or the wheel you copy) on every host;
3. copy the recipe to every host;
4. start training on every host: `bloom-jax train RECIPE --multihost` (JAX finds the other hosts by itself on
   TPU VMs; each host reads its share of every batch).
Output goes to the bucket: output_dir=BUCKET/runs/TPU (or --output-dir), checkpoints, metrics, TensorBoard
events, the token cache and final/ in it, process 0 alone writing what the hosts share. The hosts' disks hold
nothing of the run.
Preemption: a preempted spot slice sends SIGTERM; the trainer saves a checkpoint and stops. Running the command
again, on the same slice or on a new one (--create), resumes from the bucket alone.

--dry-run prints the commands without running them (and needs no gcloud).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The recipe overrides the hosts run with: output_dir in the bucket unless one is given."""
    if any(o.startswith("output_dir=") for o in args.overrides):
        return list(args.overrides)
    return [f"output_dir={output_dir(args)}", *args.overrides]


def output_dir(args: argparse.Namespace) -> str:
    return args.output_dir or f"{args.bucket.rstrip('/')}/runs/{args.tpu}"


def commands(args: argparse.Namespace) -> list[list[str]]:
    tpu = ["--zone", args.zone] + (["--project", args.project] if args.project else [])
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *tpu, "--worker=all", "--command"]
    recipe_name = args.recipe.rsplit("/", 1)[-1]
    train = shlex.join(["bloom-jax", "train", recipe_name, *run_overrides(args), "--multihost"])  # in the home dir
    out = []
    if args.create:
        out.append(["gcloud", "compute", "tpus", "tpu-vm", "create", args.tpu, *tpu,
                    f"--accelerator-type={args.accelerator}", f"--version={args.runtime}"]
                   + (["--spot"] if args.spot else []))
    out.append(ssh + [f"pip install -U 'jax[tpu]' {shlex.quote(args.package)}"])
    out.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", args.recipe, f"{args.tpu}:{recipe_name}", *tpu,
                "--worker=all"])
    out.append(ssh + [f"nohup {train} > ~/train.log 2>&1 &"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--accelerator", default="v5p-64", help="for --create: e.g. v4-256, v5p-64, v5litepod-16")
    parser.add_argument("--runtime", default="v2-alpha-tpuv5", help="for --create: the TPU VM software version")
    parser.add_argument("--spot", action="store_true", help="for --create: a preemptible (spot) slice")
    parser.add_argument("--create", action="store_true", help="create the slice first")
    parser.add_argument("--package", required=True,
                        help="what pip installs on every host: this repository's git URL, or a wheel on a bucket")
    parser.add_argument("--recipe", required=True, help="training recipe YAML to copy and run")
    parser.add_argument("--bucket", default=None,
                        help="gs://BUCKET that the run writes in (output_dir BUCKET/runs/TPU)")
    parser.add_argument("--output-dir", default=None, help="the run's output_dir, instead of BUCKET/runs/TPU")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides passed to train")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    given = args.output_dir or next((o.split("=", 1)[1] for o in args.overrides if o.startswith("output_dir=")), None)
    if given is None and args.bucket is None:
        parser.error("--bucket gs://BUCKET is needed (or --output-dir): the hosts' own disks are private to each "
                     "and lost with a preempted slice")
    if not (given or args.bucket).startswith("gs://"):
        print(f"launch_tpu_pod: {given or args.bucket} is not a gs:// URL: every host must share it, and it must "
              "outlive the slice", file=sys.stderr)
    for command in commands(args):
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            result = subprocess.run(command)
            if result.returncode != 0:
                print(f"launch_tpu_pod: failed with exit code {result.returncode}", file=sys.stderr)
                return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
