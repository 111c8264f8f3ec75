"""Bad inputs and faults, tried as a new user would, through the real entry points (issue 14).

Every case runs the command a user types (``python train.py ...``, ``python evaluate.py ...``, ``python -m data_gen``,
``python -m klal.export``, the converters) in a subprocess and checks three things: the exit status, the message (one
line, ``PROG: error: ...``, naming the file, option, split or sample at fault, no traceback) and the disk afterwards
(nothing the user had is gone, nothing half-written or no process is left behind). Data is a 16-sample grid-patch set
written by ``python -m data_gen``; the model is the tiny random Qwen2.5-VL. The training runs are marked slow.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ---------------------------------------------------------------------------------------------------------- helpers
def run_cmd(args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repository root, without KLAL_DEBUG, stdout and stderr captured."""
    env = {k: v for k, v in os.environ.items() if k != "KLAL_DEBUG"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.run(
        [PY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def error_line(proc: subprocess.CompletedProcess, prog: str, *needles: str, code: int = 2) -> str:
    """Assert ``proc`` failed with ``code`` and one ``PROG: error: ...`` line (its last stderr line) that contains every
    needle, without a traceback or a usage text; return that line."""
    err = proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == code, f"exit status {proc.returncode}, expected {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert lines, "no message on stderr"
    assert lines[-1].startswith(f"{prog}: error: "), err[-3000:]
    assert sum("error" in ln.lower() for ln in lines) == 1, err[-3000:]
    assert not any(ln.startswith("usage:") for ln in lines), err[-3000:]
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"
    return lines[-1]


def tree(path: Path) -> dict[str, int]:
    """Relative file path -> size of everything under ``path``."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def partials(folder: Path) -> list[str]:
    """Hidden ``.NAME.partial-*`` folders the data writer builds in."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return out


def generate(out: Path, num: int = 16, *extra: str) -> subprocess.CompletedProcess:
    return run_cmd(
        ["-m", "data_gen", "grid_patch", "--num", str(num), "--seed", "0", "--preset", "easy", "--image-size", "224"]
        + ["--out", str(out), "--quiet", *extra]
    )


def train_args(data: Path | None, root: Path, *extra: str, steps: int = 2) -> list[str]:
    """``train.py fit`` on the tiny model and ``data`` (None: no ``--data.paths``), ``steps`` optimizer steps, batches
    of 2, everything written under ``root``."""
    paths = ["--data.paths", f"[{data}]"] if data is not None else []
    return [
        *("train.py", "fit", "--config", "configs/demo.yaml", "--data.generate", "null", *paths),
        *("--data.batch_size", "2", "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)),
        *("--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(root)),
        *("--trainer.logger.init_args.save_dir", str(root), *extra),
    ]


def with_rows(src: Path, dst: Path, change) -> None:
    """Copy the dataset at ``src`` to ``dst`` with ``change(split, index, row) -> row`` applied to undecoded rows."""
    import datasets

    datasets.disable_caching()
    dd = datasets.load_from_disk(str(src))
    image = dd["train"].features["image"]
    out = {}
    for split, ds in dd.items():
        ds = ds.cast_column("image", datasets.Image(decode=False))
        ds = ds.map(lambda row, i, s=split: change(s, i, row), with_indices=True, keep_in_memory=True)
        out[split] = ds.cast_column("image", image)
    datasets.DatasetDict(out).save_to_disk(str(dst))


# --------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_inputs")


@pytest.fixture(scope="module")
def grid(work) -> Path:
    out = work / "grid"
    proc = generate(out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def faulty(grid, work) -> dict[str, Path]:
    """Copies of ``grid`` with one fault each: a corrupted image, a 20000 x 20000 image, a truncated .arrow file,
    evidence outside every image."""
    import datasets
    from PIL import Image

    paths = {k: work / k for k in ("corrupt", "bomb", "truncated", "outside")}
    garbage = {"bytes": b"\x89PNG\r\n\x1a\n" + b"not an image" * 40, "path": None}
    with_rows(grid, paths["corrupt"], lambda s, i, r: {**r, "image": garbage} if (s, i) == ("validation", 1) else r)
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 M pixels, 50 kB as PNG
    huge = {"bytes": buf.getvalue(), "path": None}
    with_rows(grid, paths["bomb"], lambda s, i, r: {**r, "image": huge} if (s, i) == ("validation", 0) else r)
    shutil.copytree(grid, paths["truncated"])
    (arrow,) = (paths["truncated"] / "validation").glob("*.arrow")
    os.truncate(arrow, arrow.stat().st_size // 2)
    far = {"boxes": [[5000.0, 5000.0, 5100.0, 5100.0]], "points": [], "polylines": []}
    with_rows(grid, paths["outside"], lambda s, i, r: {**r, "evidence": far})
    datasets.enable_caching()
    return paths


@pytest.fixture(scope="module")
def trained(grid, work) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished two-step run of train.py: (its version folder, the process)."""
    root = work / "run"
    proc = run_cmd(train_args(grid, root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "klal" / "version_0", proc


# ------------------------------------------------------------------------------------------------------ data lost
@pytest.mark.slow
def test_export_into_the_run_folder_is_refused_and_deletes_nothing(trained, work):
    version, _ = trained
    run = version.parent.parent
    before = tree(run)
    proc = run_cmd(["-m", "klal.export", "--adapter", str(version / "adapter"), "--out", str(run), "--overwrite"])
    error_line(proc, "python -m klal.export", str(run))
    assert tree(run) == before


@pytest.mark.slow
def test_export_into_a_foreign_folder_is_refused(trained, work):
    version, _ = trained
    mine = work / "my_notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = run_cmd(["-m", "klal.export", "--adapter", str(version / "adapter"), "--out", str(mine), "--overwrite"])
    error_line(proc, "python -m klal.export", str(mine))
    assert tree(mine) == {"notes.txt": 7}


# --------------------------------------------------------------------------------------------------- silently wrong
def test_train_paths_and_generate_together_is_one_line(grid, work):
    root = work / "both"
    proc = run_cmd(["train.py", "fit", "--config", "configs/demo.yaml", "--data.paths", f"[{grid}]"] + [
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)
    ])  # fmt: skip
    error_line(proc, "train.py", "paths", "generate")
    assert not root.exists()


@pytest.mark.slow
def test_every_run_reports_samples_without_map_and_is_quiet(trained):
    _, proc = trained
    out = proc.stdout + proc.stderr
    assert "samples without a target map: train 0/4 (0.0%), validation 0/2 (0.0%)" in out, out[-3000:]
    for noise in ("💡 Tip", "is_gradient_checkpointing", "LeafSpec", "Unable to fetch remote file", "config file in"):
        assert noise not in out, noise
    # Step-limited and not on a terminal: one plain line per print, no epoch bar.
    assert "Epoch 0/-2" not in out and "━" not in out
    assert "step 2/2 (100%)" in proc.stdout


@pytest.mark.slow
def test_run_without_any_target_map_stops_with_the_reason(faulty, work):
    root = work / "outside_run"
    proc = run_cmd(train_args(faulty["outside"], root))
    error_line(proc, "train.py", "no", "target map", "evidence entirely outside the image: 4", "klal_weight")
    assert not list(root.rglob("adapter_model.safetensors"))


@pytest.mark.slow
def test_no_map_is_fine_without_klal(faulty, work):
    root = work / "outside_ntp"
    proc = run_cmd(train_args(faulty["outside"], root, "--model.klal_weight", "0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples without a target map: train 4/4 (100.0%; evidence entirely outside the image: 4)" in proc.stdout


@pytest.mark.parametrize("value", ["0", "-3"])
def test_evaluate_max_samples_below_one(grid, work, value):
    out = work / f"eval_max_{value}"
    proc = run_cmd(["evaluate.py", "--data", str(grid), "--max_samples", value, "--out", str(out)])
    error_line(proc, "evaluate.py", "max_samples", value)
    assert not out.exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_non_zero(grid, work):
    root = work / "sigterm"
    proc = subprocess.Popen(
        [PY, *train_args(grid, root, steps=500)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "KLAL_DEBUG"},
    )
    csv = root / "klal" / "version_0" / "metrics.csv"
    deadline = time.monotonic() + 300
    # metrics.csv holds a row once a step is done (it is flushed before every batch).
    while time.monotonic() < deadline and proc.poll() is None:
        if csv.is_file() and len(csv.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    ckpt = root / "klal" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"saved {ckpt}" in out + err
    from klal.checkpoint import safe_load

    assert safe_load(ckpt)["global_step"] >= 2


# ----------------------------------------------------------------------------------------------------- left behind
def _start_datagen(out: Path, workers: int) -> subprocess.Popen:
    args = ["-m", "data_gen", "grid_patch", "--num", "4000", "--preset", "easy", "--out", str(out), "--quiet"]
    return subprocess.Popen(
        [PY, *args, "--workers", str(workers)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
        env={k: v for k, v in os.environ.items() if k != "KLAL_DEBUG"},
    )


def _wait_for_partial(folder: Path, proc: subprocess.Popen, workers: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partials(folder) and len(children(proc.pid)) >= workers:
            time.sleep(1.0)  # let the workers start on their jobs
            return
        time.sleep(0.2)
    raise AssertionError(f"data_gen did not start its workers: {proc.communicate()[1][-2000:]}")


@pytest.mark.slow
def test_kill_9_leaves_no_orphans_and_the_next_run_cleans_up(work):
    folder = work / "kill9"
    folder.mkdir()
    out = folder / "data"
    proc = _start_datagen(out, workers=2)
    _wait_for_partial(folder, proc, 2)
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    left = [p for p in workers if alive(p)]
    for p in left:  # do not leave them running if the assertion fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"orphan workers {left}"
    assert len(partials(folder)) == 1  # the dead run's; the next run of the same output removes it
    again = generate(out, 16)
    assert again.returncode == 0, again.stderr
    assert partials(folder) == [] and (out / "klal_dataset.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_within_a_second(work, workers):
    folder = work / f"ctrl_c_{workers}"
    folder.mkdir()
    proc = _start_datagen(folder / "data", workers)
    _wait_for_partial(folder, proc, workers if workers > 1 else 0)
    pids = children(proc.pid)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 130, err
    assert err.strip() == "data_gen: interrupted"
    assert took < 1.5, f"took {took:.1f} s to stop"
    assert partials(folder) == [] and not (folder / "data").exists()
    assert not any(alive(p) for p in pids)


def test_unwritable_out_is_one_line(work):
    proc = generate(Path("/proc/klal_data"))
    error_line(proc, "data_gen", "/proc/klal_data")


def test_full_disk_is_one_line_and_leaves_nothing(work):
    disk = work / "tiny_disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        proc = generate(disk / "data", 64)
        error_line(proc, "data_gen", str(disk / "data"), "No space left on device")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_truncated_last_ckpt_on_resume_is_one_line_and_adds_no_version(trained, work):
    version, _ = trained
    root = work / "truncated_resume"
    shutil.copytree(version.parent.parent, root)
    ckpt = root / "klal" / "version_0" / "checkpoints" / "last.ckpt"
    os.truncate(ckpt, ckpt.stat().st_size // 2)
    before = sorted(p.name for p in (root / "klal").iterdir())
    proc = run_cmd(train_args(work / "grid", root, "--ckpt_path", "last"))
    error_line(proc, "train.py", str(ckpt))
    assert sorted(p.name for p in (root / "klal").iterdir()) == before
    assert ckpt.is_file()  # the user's file is reported, not deleted


# ------------------------------------------------------------------------------- errors that name the culprit
@pytest.mark.parametrize(
    ("fault", "needles"),
    [
        ("corrupt", ["[validation]", "grid_patch-0-000014", "cannot decode"]),
        ("bomb", ["[validation]", "grid_patch-0-000013", "20000 x 20000", "KLAL_MAX_IMAGE_PIXELS"]),
        ("truncated", ["validation", ".arrow", "truncated"]),
    ],
)
def test_damaged_data_names_file_split_and_sample_in_preview(faulty, work, fault, needles):
    png = work / f"preview_{fault}.png"
    proc = run_cmd(["-m", "data_gen", "preview", str(faulty[fault]), "--split", "validation", "--out", str(png)])
    error_line(proc, "data_gen preview", str(faulty[fault]), *needles)
    assert not png.exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["corrupt", "bomb", "truncated"])
def test_damaged_data_names_the_sample_in_evaluate_and_train(faulty, work, fault):
    needle = {"corrupt": "grid_patch-0-000014", "bomb": "KLAL_MAX_IMAGE_PIXELS", "truncated": ".arrow"}[fault]
    out = work / f"eval_{fault}"
    proc = run_cmd(["evaluate.py", "--data", str(faulty[fault]), "--split", "validation", "--out", str(out)])
    error_line(proc, "evaluate.py", str(faulty[fault]), needle)
    assert not out.exists()  # a failed evaluation leaves no (empty) --out folder behind
    if fault != "bomb":  # training decodes a huge image where it decodes the corrupt one (klal.data.io.read_row)
        proc = run_cmd(train_args(faulty[fault], work / f"train_{fault}"))
        error_line(proc, "train.py", str(faulty[fault]), needle)


def test_train_misspelt_key_names_the_closest(work):
    proc = run_cmd(["train.py", "fit", "--config", "configs/demo.yaml", "--model.klal_wieght", "0.5"])
    error_line(proc, "train.py", "klal_wieght", "model.klal_weight")
    config = work / "typo.yaml"
    config.write_text("trainer:\n  max_stepz: 3\n")
    proc = run_cmd(["train.py", "fit", "--config", "configs/demo.yaml", "--config", str(config)])
    error_line(proc, "train.py", "max_stepz", "trainer.max_steps")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data", "extra", "needles"),
    [
        ("/no/such/data", [], ["/no/such/data"]),
        (None, ["--model.lora.r", "0"], ["lora", "r"]),
        (None, ["--data.batch_size", "0"], ["data.batch_size"]),
    ],
)
def test_train_data_and_config_mistakes_are_one_line(grid, work, data, extra, needles):
    root = work / "mistake"
    proc = run_cmd(train_args(Path(data) if data else grid, root, *extra))
    error_line(proc, "train.py", *needles)


def test_train_traceback_with_klal_debug(work):
    env = {**os.environ, "KLAL_DEBUG": "1"}
    proc = subprocess.run(
        [PY, "train.py", "fit", "--config", "configs/demo.yaml", "--data.paths", "[/x]"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.slow
def test_evaluate_accepts_one_data_dir(grid, work):
    out = work / "eval_ok"
    proc = run_cmd(["evaluate.py", "--data", str(grid), "--split", "validation", "--out", str(out), "--progress=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.json").is_file()


@pytest.mark.parametrize("module", ["klal.data.refcoco", "klal.data.pixmo"])
def test_converters_name_a_missing_source(work, module):
    out = work / f"{module}_out"
    proc = run_cmd(["-m", module, str(work / "no_such_source"), "--out", str(out)])
    error_line(proc, f"python -m {module}", str(work / "no_such_source"))
    assert not out.exists()


@pytest.mark.parametrize("module", ["klal.data.refcoco", "klal.data.pixmo"])
def test_converters_refuse_to_write_an_empty_dataset(work, module):
    src = work / f"{module}.jsonl"
    src.write_text('{"image": "x.jpg"}\n')
    out = work / f"{module}_empty"
    proc = run_cmd(["-m", module, str(src), "--out", str(out)])
    error_line(proc, f"python -m {module}", str(src), "kept 0")
    assert not out.exists()
