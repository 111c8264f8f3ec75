"""Checkpoints and faults: SIGKILL + ``--ckpt_path last`` reproduces the uninterrupted loss curve, resumable data
order, atomic and weights-only checkpoints, refusal of foreign checkpoints, adapter/merged export, NaN stop."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from klal.atomic import atomic_output_dir
from klal.checkpoint.adapter import ADAPTER_INFO, save_adapter
from klal.checkpoint.lightning_io import AtomicCheckpointIO
from klal.checkpoint.loading import UnsafeCheckpointError, safe_load
from klal.checkpoint.resume import find_last_checkpoint
from klal.data.collate import KLALCollator
from klal.data.resumable import ResumableDataLoader
from klal.models.loader import ModelConfig
from klal.models.lora import LoraSettings
from klal.module import KLALModule, OptimSettings
from tests.conftest import HANG_S, make_row

REPO = Path(__file__).resolve().parents[1]
SMALL = ModelConfig(min_pixels=56 * 56, max_pixels=112 * 112)
LORA = LoraSettings(r=4, alpha=8, dropout=0.1)


# -- a callback the training subprocesses load by class path ---------------------------------------------------------
class HangAtStep(L.Callback):
    """Test-only: once ``step`` optimizer steps are done, write ``marker`` and block, so the test can SIGKILL a run
    that is alive, mid-training and past its newest checkpoint."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(600)


# -- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    from data_gen.tasks import build_task
    from data_gen.writer import generate_dataset

    out = tmp_path_factory.mktemp("data") / "gp"
    generate_dataset(
        build_task("grid_patch", preset="easy", overrides={"image_size": 112}),
        num=24,
        seed=0,
        out=str(out),
        workers=1,
        progress=False,
    )
    return str(out)


@pytest.fixture(scope="module")
def rows():
    return [
        make_row(i, 112, 112, [28.0 * (i % 4), 28.0 * (i // 4 % 4), 28.0 * (i % 4) + 28, 28.0 * (i // 4 % 4) + 28])
        for i in range(8)
    ]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two intra-op threads on a CPU shared with other jobs spin-wait and run ~20x slower than one; results are the same.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _module(lora: LoraSettings = LORA, backbone: ModelConfig = SMALL, **kw) -> KLALModule:
    m = KLALModule(backbone=backbone, lora=lora, optim=OptimSettings(lr=5e-3, warmup_steps=2), **kw)
    m.configure_model()
    return m


def _lora_weights(m: KLALModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.model.named_parameters() if p.requires_grad}


# -- resume after SIGKILL (the whole CLI in subprocesses) ------------------------------------------------------------
def _run_config(tmp: Path, data: str, root: Path, steps: int, hang: tuple[int, str] | None = None) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    t = cfg["trainer"]
    t.update(
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        default_root_dir=str(root),
    )
    t["logger"]["init_args"]["save_dir"] = str(root)
    # The demo's callbacks as shipped (its periodic ModelCheckpoint writes last.ckpt), checkpointing every 2 steps.
    (ckpt,) = [c for c in t["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert ckpt["init_args"]["save_last"] is True
    ckpt["init_args"]["every_n_train_steps"] = 2
    if hang is not None:
        t["callbacks"].append(
            {"class_path": "tests.test_faults.HangAtStep", "init_args": {"step": hang[0], "marker": hang[1]}}
        )
    m = cfg["model"]
    m["backbone"]["max_pixels"] = 112 * 112
    m["lora"].update(r=4, alpha=8, dropout=0.1)  # dropout > 0: the continued curve matches only if the RNG is restored
    m["optim"].update(warmup_steps=2)
    cfg["data"] = {"paths": [data], "batch_size": 2, "max_train_samples": 8, "num_workers": 0}
    path = tmp / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    """``python train.py fit --config CONFIG ...`` as a user runs it (PYTHONPATH lets it import ``HangAtStep``)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = HANG_S) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _step_losses(metrics: Path) -> dict[int, float]:
    rows = csv.DictReader(metrics.read_text().splitlines())
    return {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_ckpt_path_last_matches_uninterrupted_run(tmp_path, tiny_dataset):
    """SIGKILL a run of configs/demo.yaml (its shipped periodic ModelCheckpoint, every 2 steps here) mid-epoch, after
    a checkpoint; ``--ckpt_path last`` continues it in its own folder to the uninterrupted run's losses and adapter."""
    steps = 10  # 8 training samples, batch 2: 4 batches per epoch, so the run spans epochs 0-2
    ref_root, run_root = tmp_path / "reference", tmp_path / "crashed"
    marker = tmp_path / "hung"
    ref = _start(_run_config(tmp_path, tiny_dataset, ref_root, steps), tmp_path)
    # Blocks once 7 steps are done: last.ckpt (every 2 steps) is step 6 = epoch 1, batch 2 of 4 (mid-epoch).
    crashed = _start(_run_config(tmp_path, tiny_dataset, run_root, steps, hang=(7, str(marker))), tmp_path)
    deadline = time.time() + HANG_S
    while not marker.exists():
        assert crashed.poll() is None, crashed.communicate()[0][-4000:]
        assert time.time() < deadline, "the run to be killed never reached step 7"
        time.sleep(0.2)
    last = run_root / "klal" / "version_0" / "checkpoints" / "last.ckpt"
    assert safe_load(last)["global_step"] == 6
    assert crashed.poll() is None, "the run must still be alive when it is killed"
    os.kill(crashed.pid, signal.SIGKILL)
    crashed.communicate(timeout=HANG_S)
    assert crashed.returncode == -signal.SIGKILL
    assert not (run_root / "klal" / "version_0" / "adapter").exists(), "a killed run must not have finished"

    resumed_log = _finish(_start(_run_config(tmp_path, tiny_dataset, run_root, steps), tmp_path, "--ckpt_path", "last"))
    _finish(ref)
    assert f"Restored all states from the checkpoint at {last}" in resumed_log
    assert "dataloader is not resumable" not in resumed_log

    expected = _step_losses(ref_root / "klal" / "version_0" / "metrics.csv")
    # The resumed run continues the killed run's own folder and metrics.csv: one curve, each step once.
    assert sorted(p.name for p in (run_root / "klal").iterdir()) == ["version_0"]
    metrics = run_root / "klal" / "version_0" / "metrics.csv"
    got = _step_losses(metrics)
    logged = [int(r["step"]) for r in csv.DictReader(metrics.read_text().splitlines()) if r.get("train/loss_step")]
    assert sorted(expected) == list(range(steps))
    assert logged == list(range(steps)), "steps 0-5 from the killed run, then exactly the steps after the checkpoint"
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    # Same final weights as the uninterrupted run.
    a = _adapter_tensors(ref_root / "klal" / "version_0" / "adapter")
    b = _adapter_tensors(run_root / "klal" / "version_0" / "adapter")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


# -- resume in-process at an epoch boundary --------------------------------------------------------------------------
class _Losses(L.Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.by_step[trainer.global_step] = float(outputs["loss"])


class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _fit(tmp: Path, rows, steps: int, ckpt_path: str | None = None, crash_at: int | None = None, lora=LORA):
    L.seed_everything(0)
    m = _module(lora=lora, adapter_dir=str(tmp / "adapter"))
    loader = ResumableDataLoader(rows, batch_size=2, shuffle=True, collate_fn=KLALCollator(m.processor))
    losses = _Losses()
    callbacks = [ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2), losses]
    if crash_at is not None:
        callbacks.append(_CrashAt(crash_at))
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(m, train_dataloaders=loader, ckpt_path=ckpt_path)
    return m, losses.by_step


def test_resume_at_epoch_end_matches_uninterrupted_run_and_refuses_other_lora(tmp_path, rows):
    ref, ref_losses = _fit(tmp_path / "ref", rows, steps=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "run", rows, steps=6, crash_at=5)  # last.ckpt: step 4 = end of epoch 0 (4 batches)
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    ckpt = safe_load(last)
    assert ckpt["global_step"] == 4
    assert [k for k in ckpt["state_dict"]] and all("lora_" in k for k in ckpt["state_dict"])
    resumed, losses = _fit(tmp_path / "run", rows, steps=6, ckpt_path=str(last))
    assert sorted(losses) == [5, 6]
    for step, loss in losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-6), step
    a, b = _lora_weights(ref), _lora_weights(resumed)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k

    other = LoraSettings(r=8, alpha=8, dropout=0.1)
    with pytest.raises(ValueError, match=r"another LoRA config \(r 4 vs 8") as e:
        _fit(tmp_path / "other", rows, steps=6, ckpt_path=str(last), lora=other)
    assert str(last) in str(e.value)


# -- the resumable loader --------------------------------------------------------------------------------------------
def _start_epoch(loader, epoch: int) -> None:
    """Bring a fresh loader to ``epoch`` as Lightning would: ``set_epoch`` on a sampler that has one, else by passes."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    else:
        for _ in range(epoch - loader.epoch):
            list(loader)


def _passes(loader, epochs: int) -> list[list[list[int]]]:
    out = []
    for e in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(e)
        out.append([b.tolist() for b in loader])
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda ds: ResumableDataLoader(
            ds, batch_size=3, sampler=DistributedSampler(ds, num_replicas=2, rank=1, seed=5)
        ),
        lambda ds: ResumableDataLoader(ds, batch_size=3, shuffle=True, seed=5),
        lambda ds: ResumableDataLoader(ds, batch_size=3, shuffle=True, seed=5, num_workers=1, persistent_workers=True),
    ],
    ids=["distributed_sampler", "shuffle", "shuffle_workers"],
)
def test_resumable_loader_continues_the_same_order(make):
    ds = list(range(23))
    full = _passes(make(ds), 3)
    assert full[0] != full[1], "epochs must differ in order"
    first = make(ds)
    _start_epoch(first, 1)
    it = iter(first)
    seen = [next(it).tolist() for _ in range(2)]
    state = first.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 2)

    again = make(ds)
    again.load_state_dict(state)
    rest = [b.tolist() for b in again]
    assert seen + rest == full[1]
    assert len(again) == len(full[1]), "the length stays the epoch's, as Lightning counts from the restored batch"
    if hasattr(again.sampler, "set_epoch"):
        again.sampler.set_epoch(2)
    assert [b.tolist() for b in again] == full[2]

    # A position at the end of an epoch continues with the next epoch.
    end = make(ds)
    end.load_state_dict({**state, "batches": state["num_batches"]})
    assert [b.tolist() for b in end] == full[2]


def test_every_rank_continues_its_own_share_from_rank_zeros_state():
    # Lightning saves rank 0's loader state and every rank loads it.
    ds = list(range(23))

    def make(rank):
        return ResumableDataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=2, rank=rank, seed=7))

    rank0 = make(0)
    it = iter(rank0)
    next(it), next(it)
    state = rank0.state_dict()
    rank1 = make(1)
    rank1.load_state_dict(state)
    assert [b.tolist() for b in rank1] == [b.tolist() for b in make(1)][2:]


def test_resumable_loader_leaves_global_rng_alone_and_warns_on_changed_order():
    ds = list(range(10))
    loader = ResumableDataLoader(ds, batch_size=2, shuffle=True, seed=1)
    before = torch.get_rng_state()
    _passes(loader, 2)
    assert torch.equal(before, torch.get_rng_state()), "iterating must not draw from the global torch RNG"
    state = {**loader.state_dict(), "epoch": 0, "batches": 2}
    bigger = ResumableDataLoader(ds, batch_size=5, shuffle=True, seed=1)
    with pytest.warns(UserWarning, match=r"data order changed \(num_batches 5 -> 2\)"):
        bigger.load_state_dict(state)
    assert sum(len(b) for b in bigger) == 10, "a changed order restarts the epoch from its beginning"
    with pytest.raises(ValueError, match="lacks"):
        loader.load_state_dict({"epoch": 0})


def test_from_loader_keeps_sampler_and_collate(rows, tiny_processor):
    collate = KLALCollator(tiny_processor)
    plain = DataLoader(rows, batch_size=4, sampler=DistributedSampler(rows, 1, 0, seed=3), collate_fn=collate)
    res = ResumableDataLoader.from_loader(plain)
    assert res.sampler is plain.sampler and res.collate_fn is collate and res.batch_size == 4
    assert [b["ids"] for b in res] == [b["ids"] for b in plain]


# -- atomic, weights-only checkpoints --------------------------------------------------------------------------------
class _Boom:
    """Unpickling this would run code (writes a file): weights-only loading must refuse it instead."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "executed"))


def test_crash_during_save_keeps_previous_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    (path.parent / ".last.ckpt.stale.tmp").write_bytes(b"left by a killed writer")
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # part of the file is on disk when the writer dies
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(path.parent) == ["last.ckpt"], "no temporary or partial file remains"
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(3))


def test_an_output_folder_is_written_whole_or_not_at_all(tmp_path):
    """atomic_output_dir (evaluate.py's outputs): a failure or Ctrl-C leaves nothing and names the folder; an existing
    folder keeps the files it did not write."""
    out = tmp_path / "eval"

    def full_disk(folder: str) -> None:
        (Path(folder) / "results.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=rf"No space left on device: '{out}'"):
        atomic_output_dir(full_disk, out)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "results.json").write_text("old")
    atomic_output_dir(lambda folder: (Path(folder) / "results.json").write_text("new"), out)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"notes.txt": "mine", "results.json": "new"}

    def interrupted(folder: str) -> None:
        (Path(folder) / "gallery_x.tmp.png").write_text("half a picture")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_output_dir(interrupted, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"] and len(list(out.iterdir())) == 2


def test_weights_only_refuses_foreign_objects_and_admits_klal_configs(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"hyper_parameters": {"backbone": SMALL, "lora": LORA}, "global_step": 3}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["hyper_parameters"]["backbone"] == SMALL and loaded["hyper_parameters"]["lora"] == LORA

    marker = tmp_path / "executed"
    with pytest.raises(UnsafeCheckpointError, match=r"weights_only loading refuses: \['builtins.getattr'"):
        io.save_checkpoint({"global_step": 4, "x": _Boom(str(marker))}, path)
    assert io.load_checkpoint(path)["global_step"] == 3, "a refused save leaves the previous checkpoint"
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"x": _Boom(str(marker))}, foreign)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        safe_load(foreign)
    assert not marker.exists(), "nothing from the file was executed"


def test_find_last_checkpoint_picks_newest_across_versions(tmp_path):
    old = tmp_path / "klal" / "version_0" / "checkpoints" / "last.ckpt"
    new = tmp_path / "klal" / "version_1" / "checkpoints" / "last-v1.ckpt"
    for i, p in enumerate((old, new)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
    (tmp_path / "klal" / "version_1" / "checkpoints" / "epoch=0.ckpt").write_bytes(b"x")
    assert find_last_checkpoint([str(tmp_path)]) == str(new)
    assert find_last_checkpoint([str(tmp_path / "nowhere")]) is None
    # DeepSpeed writes a checkpoint as a folder and rewrites the files inside: the newest file dates the folder.
    folder = tmp_path / "klal" / "version_2" / "checkpoints" / "last.ckpt"
    inner = folder / "checkpoint" / "mp_rank_00_model_states.pt"
    inner.parent.mkdir(parents=True)
    inner.write_bytes(b"x")
    (folder / "latest").write_text("checkpoint")
    for p in (folder, inner.parent, folder / "latest"):
        os.utime(p, (900, 900))
    os.utime(inner, (1002, 1002))
    assert find_last_checkpoint([str(tmp_path)]) == str(folder)
    os.utime(inner, (999, 999))
    assert find_last_checkpoint([str(tmp_path)]) == str(new)


# -- refusing checkpoints of another base model or LoRA config -------------------------------------------------------
@pytest.fixture(scope="module")
def saved_checkpoint() -> dict:
    m = _module(lora=LoraSettings(r=4, alpha=8, dropout=0.0, targets="attention", layers=None))
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    return ckpt


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        (LoraSettings(r=8, alpha=8), r"r 4 vs 8"),
        (LoraSettings(r=4, alpha=16), r"alpha 8 vs 16"),
        (LoraSettings(r=4, alpha=8, targets=["q_proj", "v_proj"]), r"targets \[.*o_proj.*\] vs \['self_attn.q_proj'"),
        (LoraSettings(r=4, alpha=8, layers=[0, -1]), r"layers \[0, 1, 2, 3\] vs \[0, 3\]"),
    ],
    ids=["r", "alpha", "targets", "layers"],
)
def test_checkpoint_of_another_lora_config_is_refused(saved_checkpoint, lora, expected):
    m = _module(lora=lora)
    with pytest.raises(ValueError, match="another LoRA config") as e:
        m.on_load_checkpoint(saved_checkpoint)
    assert e.match(expected)
    # Dropout is not part of the weights' identity: another dropout loads.
    _module(lora=LoraSettings(r=4, alpha=8, dropout=0.3)).on_load_checkpoint(saved_checkpoint)


def test_checkpoint_without_state_dict_is_checked_by_its_fingerprints(saved_checkpoint):
    """FSDP (full checkpoints) and DeepSpeed restore the weights before ``on_load_checkpoint`` and hand it no state
    dict: the same run's checkpoint must load, another LoRA config or base must still be refused."""
    no_weights = {k: v for k, v in saved_checkpoint.items() if k != "state_dict"}
    _module(lora=LoraSettings(r=4, alpha=8)).on_load_checkpoint(no_weights)
    with pytest.raises(ValueError, match=r"another LoRA config \(r 4 vs 8"):
        _module(lora=LoraSettings(r=8, alpha=8)).on_load_checkpoint(no_weights)
    with pytest.raises(ValueError, match=r"another base model \(tiny_seed differ\)"):
        _module(backbone=ModelConfig(min_pixels=56 * 56, max_pixels=112 * 112, tiny_seed=1)).on_load_checkpoint(
            no_weights
        )
    # A strategy that loads checkpoint["state_dict"] itself after the hook (one device, DDP) gets a clear refusal
    # instead of Lightning's KeyError.
    m = _module(lora=LoraSettings(r=4, alpha=8))
    m.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"holds no weights \(no 'state_dict'\)"):
        m.on_load_checkpoint(no_weights)


def test_saved_state_dict_keeps_exactly_the_trainable_tensors(saved_checkpoint):
    m = _module(lora=LoraSettings(r=4, alpha=8, dropout=0.0, targets="attention", layers=None))
    expected = {f"model.{n}": p for n, p in m.model.named_parameters() if p.requires_grad}
    full = m.state_dict()
    ckpt = {"state_dict": dict(full)}
    m.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == set(expected) and len(full) > 3 * len(expected)
    assert all(torch.equal(ckpt["state_dict"][k], expected[k]) for k in expected)
    # FSDP with a full state dict gathers it on rank 0 only; the other ranks' hook gets an empty one.
    empty = {"state_dict": {}}
    m.on_save_checkpoint(empty)
    assert empty["state_dict"] == {}
    # Parameter names under FSDP carry wrapper segments that the gathered state dict does not.
    wrapped = {k.replace("layers.0.", "layers.0._fsdp_wrapped_module."): v for k, v in full.items()}
    ckpt = {"state_dict": wrapped}
    m.on_save_checkpoint(ckpt)
    assert len(ckpt["state_dict"]) == len(expected)


def test_checkpoint_of_another_base_model_is_refused(saved_checkpoint):
    other_seed = _module(backbone=ModelConfig(min_pixels=56 * 56, max_pixels=112 * 112, tiny_seed=1))
    with pytest.raises(ValueError, match=r"another base model \(tiny_seed differ\).*tiny_seed=0.*tiny_seed=1"):
        other_seed.on_load_checkpoint(saved_checkpoint)
    m = _module(lora=LoraSettings(r=4, alpha=8))
    with pytest.raises(ValueError, match=r"base model 'Qwen/Qwen2.5-VL-7B-Instruct', but this run uses 'tiny'"):
        m.on_load_checkpoint({**saved_checkpoint, "klal_base_model": "Qwen/Qwen2.5-VL-7B-Instruct"})
    # Without fingerprints (older checkpoints) the weights themselves must still match this run's.
    sd = dict(saved_checkpoint["state_dict"])
    sd.pop(sorted(sd)[0])
    with pytest.raises(ValueError, match="1 trainable weights missing"):
        m.on_load_checkpoint({"state_dict": sd})


# -- export ----------------------------------------------------------------------------------------------------------
def test_export_adapter_and_merged_model_reproduce_training_logits(tmp_path, rows, capsys):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from klal import export
    from klal.models.loader import load_model_and_processor, load_processor

    m = _module()
    g = torch.Generator().manual_seed(0)
    for n, p in m.model.named_parameters():
        if "lora_" in n:  # a non-zero B so the adapter changes the logits
            p.data = torch.randn(p.shape, generator=g) * 0.2
    adapter = tmp_path / "adapter"
    save_adapter(m.model, str(adapter), m.backbone, m.lora, m.checkpoint_fingerprint(), processor=m.processor)
    assert json.loads((adapter / ADAPTER_INFO).read_text())["backbone"]["max_pixels"] == 112 * 112

    batch = KLALCollator(m.processor)(rows[:2])
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    inputs = {k: batch[k] for k in keys}
    m.eval()
    with torch.no_grad():
        ref = m.model(**inputs).logits
        base, _ = load_model_and_processor(SMALL)
        plain_base = base(**inputs).logits
    assert (ref - plain_base).abs().max() > 1e-2, "the adapter must matter for this test to mean anything"

    export.main(["--adapter", str(adapter), "--out", str(tmp_path / "a")])
    export.main(["--adapter", str(adapter), "--merge", "--out", str(tmp_path / "merged")])
    peft_model = PeftModel.from_pretrained(load_model_and_processor(SMALL)[0], str(tmp_path / "a")).eval()
    merged, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(tmp_path / "merged"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert merged.config.text_config.num_hidden_layers == m.text_config.num_hidden_layers
    with torch.no_grad():
        assert (peft_model(**inputs).logits - ref).abs().max() < 1e-5
        assert (merged.eval()(**inputs).logits - ref).abs().max() < 1e-5
    # The saved processor rebuilds the same inputs.
    processor = load_processor(
        ModelConfig(name_or_path=str(tmp_path / "merged"), min_pixels=56 * 56, max_pixels=112 * 112)
    )
    again = KLALCollator(processor)(rows[:2])
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert torch.equal(again["pixel_values"], batch["pixel_values"])

    info_file = adapter / ADAPTER_INFO
    data = json.loads(info_file.read_text())
    data["fingerprint"]["base"]["architecture"]["hidden_size"] = 128
    info_file.write_text(json.dumps(data))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        export.main(["--adapter", str(adapter), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "another base model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export.main(["--adapter", str(tmp_path), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "no adapter_config.json" in capsys.readouterr().err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_export_never_deletes_what_it_did_not_write(tmp_path, capsys):
    """Issue 14: ``--out RUN`` with the adapter at ``RUN/klal/version_0/adapter`` used to delete the whole run."""
    from klal import export
    from klal.export import EXPORT_INFO

    m = _module()
    run_dir = tmp_path / "RUN"
    adapter = run_dir / "klal" / "version_0" / "adapter"
    save_adapter(m.model, str(adapter), m.backbone, m.lora, m.checkpoint_fingerprint(), processor=m.processor)
    (run_dir / "klal" / "version_0" / "metrics.csv").write_text("step,loss\n0,1.0\n")
    (run_dir / "notes.txt").write_text("mine")
    before = _tree(run_dir)

    def refused(out: Path, *extra: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            export.main(["--adapter", str(adapter), "--out", str(out), *extra])
        assert e.value.code == 2
        return capsys.readouterr().err

    for extra in ((), ("--overwrite",)):
        assert "a folder containing the adapter" in refused(run_dir, *extra)
        assert "a folder containing the adapter" in refused(run_dir / "klal", *extra)
        assert "the adapter folder itself" in refused(adapter, *extra)
        assert "inside the adapter folder" in refused(adapter / "sub", *extra)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    assert "non-empty folder that klal did not export" in refused(other, "--overwrite")
    assert (other / "keep.txt").read_text() == "keep"
    assert "is a file" in refused(other / "keep.txt")
    assert _tree(run_dir) == before, "nothing of the run may change"

    out = tmp_path / "exported"
    (out).mkdir()  # an empty folder is fine
    export.main(["--adapter", str(adapter), "--out", str(out)])
    assert json.loads((out / EXPORT_INFO).read_text())["kind"] == "adapter"
    assert "holds a previous export; pass --overwrite" in refused(out, "--merge")
    export.main(["--adapter", str(adapter), "--out", str(out), "--merge", "--overwrite"])
    assert json.loads((out / EXPORT_INFO).read_text())["kind"] == "merged"
    assert _tree(run_dir) == before
    # The processor in the stock layout (what AutoProcessor and vLLM read), with the adapter's pixel bounds.
    names = {"processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"}
    assert names | {"chat_template.jinja", "tokenizer_config.json"} <= set(os.listdir(out))
    config = json.loads((out / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2_5_VLProcessor"
    assert config["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    assert config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert config["image_processor"]["size"] == {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    flat = json.loads((out / "preprocessor_config.json").read_text())
    assert (flat["min_pixels"], flat["max_pixels"]) == (56 * 56, 112 * 112)
    assert json.loads((out / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


def test_adapter_loading_uses_the_saved_pixel_bounds_unless_told_otherwise(tmp_path):
    """evaluate.py and every GroundingModel.load caller: an adapter trained at 112^2 is evaluated at 112^2, not at the
    default bound, unless the caller sets a bound of its own."""
    from klal.models.loader import with_saved_pixel_bounds
    from klal.session import GroundingModel

    m = _module()
    adapter = tmp_path / "adapter"
    save_adapter(m.model, str(adapter), m.backbone, m.lora, m.checkpoint_fingerprint(), processor=m.processor)
    default = ModelConfig()
    assert default.max_pixels != 112 * 112
    gm = GroundingModel.load(default, str(adapter))
    assert gm.processor.image_processor.size == {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    chosen = ModelConfig(max_pixels=224 * 224)
    assert with_saved_pixel_bounds(chosen, adapter).max_pixels == 224 * 224
    assert GroundingModel.load(chosen, str(adapter)).processor.image_processor.size["longest_edge"] == 224 * 224
    # An adapter of another tiny seed is refused by content (its recorded name is still "tiny").
    with pytest.raises(ValueError, match=r"another base model \(weights differ\)"):
        GroundingModel.load(ModelConfig(tiny_seed=3), str(adapter))


# -- NaN / inf -------------------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_with_step_and_sample_ids_before_any_update(tmp_path, rows, monkeypatch):
    L.seed_everything(0)
    m = _module(adapter_dir=str(tmp_path / "adapter"))
    seen: list[list[str]] = []
    original = KLALModule.compute_losses

    def poisoned(self, batch, *args, **kwargs):
        parts = original(self, batch, *args, **kwargs)
        seen.append(list(batch["ids"]))
        if len(seen) == 3:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(KLALModule, "compute_losses", poisoned)
    snapshot: dict[str, torch.Tensor] = {}

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshot.update(_lora_weights(pl_module))

    loader = DataLoader(rows, batch_size=2, collate_fn=KLALCollator(m.processor))
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[Snap()],
    )
    with pytest.raises(FloatingPointError, match=r"non-finite train loss at global step 2 .*loss=nan") as e:
        trainer.fit(m, train_dataloaders=loader)
    assert str(seen[2]) in str(e.value), "the message names the batch's sample ids"
    assert trainer.global_step == 2
    assert all(torch.equal(p, snapshot[n]) for n, p in _lora_weights(m).items()), "no update after the bad batch"
    assert not (tmp_path / "adapter").exists(), "a failed run writes no final adapter"
