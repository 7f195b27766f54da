"""Training on several processes: 2 gloo ranks on CPU (DistributedDataParallel), rank-0-only files,
rank-sharded batches, equality with one process on the union batch, resume under torchrun and on
another number of ranks."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# paired-inpainting: GroupNorm only (no batch statistics), so DDP on 2 ranks equals one process on
# both ranks' batches up to float rounding; small widths and crops keep it fast on 2 cores. Widths of
# 16 put 2 channels in each of GroupNorm's 8 groups: with 8 (one channel per group) the conv biases
# before it have an exactly-zero gradient in exact arithmetic, and Adam turns their rounding noise
# into lr-sized steps that differ between any two summation orders
PCI = dict(input_size=32, batch_size=3, widths=[16, 16, 16, 16, 16], layer=4, warmup_steps=1, lr=2e-3, workers=0,
           checkpoint_every=100, seed=5, precision="fp32", diagnose_every=2)
RUN_FILES = {"config.json", "checkpoint.pt", "log.csv", "model.safetensors"}
UNION = "paired-inpainting-union-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forbid_writes() -> None:
    """Rank > 0 must never write into the run folder: make every writer of the loop fail loudly."""
    from microsnoop.train import loop

    def refuse(*_, **__):
        raise AssertionError("a rank other than 0 tried to write a run file")

    for name in ("atomic_path", "save_training_state", "export_encoder", "RunLog"):
        setattr(loop, name, refuse)


def _ddp_worker(rank: int, world: int, port: int, data: str, run: str, options: dict, record: str) -> None:
    """One gloo rank: joins the group, records a digest of every batch it trains on, runs train()."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from microsnoop.train.loop import train
    from microsnoop.train.methods.paired_inpainting import PairedInpainting

    seen: list[list] = []
    original = PairedInpainting.loss

    def recording_loss(self, model, batch):
        seen.append([int(batch["step"]), hashlib.sha256(batch["tgt_protein"].numpy().tobytes()).hexdigest()])
        return original(self, model, batch)

    PairedInpainting.loss = recording_loss
    if rank > 0:
        _forbid_writes()
    try:
        res = train(data, run, method="paired-inpainting", device="cpu", options=options,
                    stop_after=options.get("stop_after"))
        Path(record, f"rank{rank}.json").write_text(json.dumps({"batches": seen, "summary": res}))
    finally:
        torch.distributed.destroy_process_group()


def _spawn(data: Path, run: Path, record: Path, options: dict) -> list[dict]:
    record.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(data), str(run), options, str(record)),
                                nprocs=2, join=True)
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]


def _register_union_method() -> None:
    """One process whose step-i batch is rank 0's step-i batch followed by rank 1's (test-only method)."""
    from microsnoop.train.base import _METHODS, MethodSpec, register_method
    from microsnoop.train.methods.paired_inpainting import PairedInpainting

    class Union(torch.utils.data.Dataset):
        def __init__(self, parts):
            self.parts = parts

        def __len__(self):
            return 2 ** 62

        def __getitem__(self, step):
            batches = [p[step] for p in self.parts]
            return {k: v if k == "step" else torch.cat([b[k] for b in batches]) for k, v in batches[0].items()}

    class UnionPCI(PairedInpainting):
        name = UNION

        def make_dataset(self, pool, config, shard=(0, 1)):
            return Union([super(UnionPCI, self).make_dataset(pool, config, (r, 2)) for r in range(2)])

    if UNION not in _METHODS:
        register_method(MethodSpec(name=UNION, factory=UnionPCI, description="test only"))


@pytest.fixture(scope="module")
def pci_data(yeast_subset) -> Path:
    return yeast_subset.parent  # 96 real yeast cells (GFP, RFP), all Metadata_Split == train, 2 fields


@pytest.fixture(scope="module")
def ddp_run(pci_data, tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp")
    records = _spawn(pci_data, tmp / "run", tmp / "record", {**PCI, "steps": 3})
    return tmp / "run", records


def test_two_gloo_ranks_write_once_and_see_different_batches(ddp_run):
    run, records = ddp_run
    assert {p.name for p in run.iterdir()} == RUN_FILES  # rank 1's writers raise if called (_forbid_writes)
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["segments"] == [{"from_step": 0, "world_size": 2, "batch_size": 3}]
    assert config["sync_bn_used"] is False
    assert list(pd.read_csv(run / "log.csv")["step"]) == [0, 1, 2]
    r0, r1 = (dict((s, h) for s, h in r["batches"]) for r in records)
    assert sorted(r0) == sorted(r1) == [0, 1, 2]
    assert all(r0[s] != r1[s] for s in r0)  # rank-sharded: the ranks trained on different cells
    assert records[0]["summary"]["world_size"] == 2 and records[0]["summary"]["images_seen"] == 3 * 3 * 2
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_by_rank"]) == 2


def test_ddp_equals_one_process_on_the_union_of_both_ranks_batches(ddp_run, pci_data, tmp_path):
    from microsnoop.train.loop import train

    run, _ = ddp_run
    _register_union_method()
    # the ranks compute with 1 thread each; oneDNN's reductions depend on the thread count, and
    # 3 Adam steps amplify that rounding (1 vs 2 threads alone: 2.5% relative weight change), so
    # the reference uses 1 thread too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(pci_data, tmp_path / "union", method=UNION, options={**PCI, "steps": 3})
        train(pci_data, tmp_path / "rank0only", method="paired-inpainting", options={**PCI, "steps": 3})
    finally:
        torch.set_num_threads(threads)
    ddp = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    one = torch.load(tmp_path / "union" / "checkpoint.pt", weights_only=True)["model"]
    assert ddp.keys() == one.keys()
    init = _initial_weights()
    alone = torch.load(tmp_path / "rank0only" / "checkpoint.pt", weights_only=True)["model"]

    def norm(a, b):
        return sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a) ** 0.5

    update = norm(ddp, init)  # how far 3 AdamW steps moved the weights
    worst = max(float((ddp[k] - one[k]).abs().max()) for k in ddp)
    print(f"DDP vs union: max |dw| {worst:.3g}, relative {norm(ddp, one) / update:.3g}; "
          f"vs rank 0 alone: relative {norm(ddp, alone) / update:.3g}")
    assert update > 0.1
    assert worst < 1e-4 and norm(ddp, one) < 1e-4 * update  # measured: 8.7e-06 and 1.1e-05 (rounding)
    # and the same loop on rank 0's batches alone ends elsewhere: both ranks' batches were used
    assert norm(ddp, alone) > 0.1 * update


def _initial_weights() -> dict[str, torch.Tensor]:
    from microsnoop.train.base import get_method
    from microsnoop.train.loop import LOOP_DEFAULTS

    m = get_method("paired-inpainting")
    torch.manual_seed(PCI["seed"])
    return m.build({**LOOP_DEFAULTS, **m.defaults, **PCI}).state_dict()


def test_resume_on_a_different_number_of_ranks(pci_data, tmp_path):
    """2 ranks stop after step 2; one process continues to step 4 (not bit-exact by design: other batches)."""
    from microsnoop.train.loop import train

    run = tmp_path / "run"
    _spawn(pci_data, run, tmp_path / "record", {**PCI, "steps": 4, "checkpoint_every": 2, "stop_after": 2})
    with pytest.warns(UserWarning, match="resuming a 2-rank run on 1 ranks"):
        res = train(pci_data, run, resume=True)
    assert res["steps"] == 4 and res["world_size"] == 1 and res["images_seen"] == 2 * 3 * 2 + 2 * 3
    config = json.loads((run / "config.json").read_text())
    assert [s["world_size"] for s in config["segments"]] == [2, 1] and config["world_size"] == 1
    assert list(pd.read_csv(run / "log.csv")["step"]) == [0, 1, 2, 3]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4


# ---------------------------------------------------------------- torchrun: kill and resume
def _torchrun(args: list) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "microsnoop", "train", *map(str, args)]


def _env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [d for k in kids for d in (k, *_descendants(k))]


def _check(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank processes through /proc (Linux)")
def test_killed_two_rank_run_resumes_under_torchrun_to_the_same_weights(tiny_pool, tmp_path):
    steps = 24
    args = ["--data", tiny_pool, "--input-size", "32", "--batch-size", "2", "--steps", steps, "--warmup-steps", "2",
            "--checkpoint-every", "4", "--workers", "0", "--precision", "fp32", "--seed", "2",
            "--set", "widths=[8,16,16,16]"]
    _check(subprocess.run(_torchrun(args + ["-o", tmp_path / "whole"]), capture_output=True, text=True,
                          env=_env(), timeout=300))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(args + ["-o", killed]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())
    deadline = time.time() + 200
    log = killed / "log.csv"
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 8):
        time.sleep(0.02)  # header + steps 0..6 logged: the step-4 checkpoint is on disk
    for pid in [*_descendants(proc.pid), proc.pid]:  # both ranks and the launcher, as a scheduler would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    at = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 4 <= at < steps and not (killed / "model.safetensors").exists()
    r = subprocess.run(_torchrun(args + ["-o", killed, "--resume"]), capture_output=True, text=True, env=_env(),
                       timeout=300)
    _check(r)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == steps and b["world_size"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit-for-bit
    la, lb = pd.read_csv(tmp_path / "whole" / "log.csv"), pd.read_csv(killed / "log.csv")
    assert list(lb["step"]) == list(range(steps))  # each step once, although the kill left rows past the checkpoint
    assert np.array_equal(la["loss"].values, lb["loss"].values)
    assert {p.name for p in killed.iterdir()} == RUN_FILES  # no temp file of the killed run left behind
    config = json.loads((killed / "config.json").read_text())
    assert [(s["from_step"], s["world_size"]) for s in config["segments"]] == [(0, 2), (at, 2)]


# ---------------------------------------------------------------- policies (no processes)
def test_sync_batchnorm_policy_and_conversion():
    """auto: SyncBatchNorm with several CUDA ranks only; the converted mae-unet keeps its state-dict
    keys (checkpoints load across world sizes) and the frozen encoder BNs stay in eval mode."""
    from microsnoop.core.errors import MicrosnoopError
    from microsnoop.train.base import get_method
    from microsnoop.train.loop import LOOP_DEFAULTS, _prepare_model, use_sync_bn

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not use_sync_bn({"sync_bn": "auto"}, cpu, 2) and use_sync_bn({"sync_bn": "auto"}, gpu, 2)
    assert not use_sync_bn({"sync_bn": "auto"}, gpu, 1) and not use_sync_bn({"sync_bn": False}, gpu, 4)
    with pytest.raises(MicrosnoopError, match="SyncBatchNorm does not run on CPU"):
        use_sync_bn({"sync_bn": True}, cpu, 2)
    m = get_method("mae-unet")
    config = {**LOOP_DEFAULTS, **m.defaults, "widths": [8, 16], "freeze_encoder_bn": True}
    plain, _ = _prepare_model(m, config, cpu, sync_bn=False, resume=False)
    synced, _ = _prepare_model(m, config, cpu, sync_bn=True, resume=False)
    kinds = {type(x).__name__ for x in synced.modules()}
    assert "SyncBatchNorm" in kinds and not {"BatchNorm2d", "BatchNorm1d"} & kinds
    assert plain.state_dict().keys() == synced.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in synced.state_dict().items())
    enc_bn = [x for x in synced.encoder.modules() if isinstance(x, torch.nn.SyncBatchNorm)]
    dec_bn = [x for x in synced.decoder.modules() if isinstance(x, torch.nn.SyncBatchNorm)]
    assert enc_bn and not any(x.training for x in enc_bn) and all(x.training for x in dec_bn)


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    from microsnoop.core.device import local_device
    from microsnoop.core.errors import MicrosnoopError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_device("cuda") == torch.device("cuda", 3)
    assert local_device("cpu") == torch.device("cpu")
    with pytest.raises(MicrosnoopError, match="use --device cuda"):
        local_device("cuda:0")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert local_device("cuda:2") == torch.device("cuda", 2)
