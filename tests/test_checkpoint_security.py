"""Crafted checkpoints run nothing, credentials are written nowhere, and checkpoints come out in the files people
expect, with the real `launch` command (2 gloo ranks to resume, 1 to fine-tune), `launch ckpt export`, on local
disk and on the S3 endpoint.

A crafted `.metadata` is built from raw pickle opcodes (or, for a path out of the step folder, from a real one with
its data files renamed) inside a copy of one small committed run, with manifest.json's size for it updated, so that
only the metadata gives it away. Each payload would create a marker file if anything in it ran."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_params, launch, launch_env, run_launch, write_recipe
from test_checkpoint import RECIPE as CHECKPOINT_RECIPE  # test_credentials_never_written runs it

# conftest.BASE with these changes
RECIPE = ("model={_target_: launcher.zoo.models.MLP, in_features: 8, hidden: 8, out_features: 2}",
          "data.train.num_samples=64", "data.train.num_features=8", "data.train.num_classes=2", "data.batch_size=8",
          "optimizer={_target_: torch.optim.SGD, lr: 0.1}", "trainer.max_steps=4", "checkpoint.every_steps=2")
MODULE = "torch.distributed.checkpoint.metadata"


def step(n: int) -> str:
    return f"step-{n:09d}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One small committed run: a checkpoint directory with step 2 and step 4, never changed by a test (tests copy)."""
    tmp = tmp_path_factory.mktemp("security-ref")
    _, run_dir = launch(tmp, write_recipe(tmp, *RECIPE), run="ref")
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [step(2), step(4)]
    return ckpt


# ----------------------------------------------------------------------------------------------- crafted files

def _text(s: str) -> bytes:
    b = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b if len(b) < 256 else pickle.BINUNICODE + \
        len(b).to_bytes(4, "little") + b


def calling(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle that looks up the global `module` `name` (STACK_GLOBAL) and calls it with `arg` (REDUCE)."""
    return (pickle.PROTO + b"\x04" + _text(module) + _text(name) + pickle.STACK_GLOBAL + _text(arg) + pickle.TUPLE1
            + pickle.REDUCE + pickle.STOP)


def payload(kind: str, marker: Path, real: bytes) -> tuple[bytes, str]:
    """A crafted `.metadata` of `kind`, and what the refusal must name."""
    touch = f"touch {marker}"
    if kind == "dotted":  # resolves through the metadata module's own `os` attribute
        return calling(MODULE, "os.system", touch), f"{MODULE}.os.system"
    if kind == "outside":
        return calling("posix", "system", touch), "posix.system"
    if kind == "reduce":
        return calling("builtins", "eval", f"__import__('os').system('{touch}')"), "builtins.eval"
    meta = pickle.loads(real)  # our own file: a trusted copy to alter
    for item in meta.storage_data.values():  # the data of the checkpoint beside it: today this loads
        item.relative_path = f"../{step(2)}/{item.relative_path}"
    return pickle.dumps(meta), f"'../{step(2)}/__"


KINDS = ["dotted", "outside", "reduce", "traversal"]


def craft(folder: Path, kind: str, marker: Path) -> str:
    """Replace `folder`'s .metadata with a payload and update its size in the manifest; returns the refused name."""
    data, refused = payload(kind, marker, (folder / ".metadata").read_bytes())
    (folder / ".metadata").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][".metadata"] = len(data)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return refused


def copy_run(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    return dest


def upload(store, local: Path, run: str) -> str:
    """The checkpoint directory `local` where `store` keeps `run`'s checkpoints; its URL."""
    url = store.url(run)
    if store.kind == "local":
        shutil.copytree(local, url)
    else:
        store._fs().put(str(local), url, recursive=True)
    return url


def tree(store, url: str) -> dict[str, bytes]:
    fs = store._fs()
    return {p[len(url.split("://")[-1]):]: fs.cat_file(p) for p in fs.find(url)}


# ----------------------------------------------------------------------------------------------- the unpickler

@pytest.mark.parametrize("module,name", [
    (MODULE, "os.system"), (MODULE, "torch.os.system"), (MODULE, "Metadata.__init__"), ("torch", "load"),
    ("torch", "os.system"), ("torch.serialization", "os.system"), ("posix", "system"), ("os", "system"),
    ("builtins", "getattr"), ("builtins", "eval"), ("subprocess", "call")])
def test_metadata_reader_refuses_every_global_but_dcps_own(tmp_path, module, name):
    from launcher.checkpoint import dcp_io
    from launcher.checkpoint.storage import Storage
    marker = tmp_path / "ran"
    (tmp_path / "step-1").mkdir()
    (tmp_path / "step-1" / ".metadata").write_bytes(calling(module, name, f"touch {marker}"))
    with pytest.raises(pickle.UnpicklingError) as e:
        dcp_io.metadata(Storage(str(tmp_path)), str(tmp_path / "step-1"))
    assert f"{tmp_path}/step-1/.metadata refers to the Python global {module}.{name}" in str(e.value)
    assert not marker.exists(), "reading checkpoint metadata ran code"


def test_metadata_reader_refuses_data_files_outside_the_step_folder(tmp_path, reference):
    from launcher.checkpoint import dcp_io
    from launcher.checkpoint.storage import Storage
    meta = pickle.loads((reference / step(4) / ".metadata").read_bytes())
    (tmp_path / "step-1").mkdir()
    for bad in ("../../x", "/etc/passwd", "a/../../x", ""):
        for item in meta.storage_data.values():
            item.relative_path = bad
        (tmp_path / "step-1" / ".metadata").write_bytes(pickle.dumps(meta))
        with pytest.raises(pickle.UnpicklingError, match=rf"{tmp_path}/step-1/.metadata names the data file"):
            dcp_io.metadata(Storage(str(tmp_path)), str(tmp_path / "step-1"))


# ----------------------------------------------------------------------------------------------- resume

S3_ONLY = pytest.mark.parametrize("store_kind", ["s3"], indirect=True)  # local reads are the same code, cheaper


@S3_ONLY
def test_resume_passes_over_crafted_checkpoints_and_never_removes_them(tmp_path, store, reference):
    """Four crafted folders newer than the good step 2: resume warns about each and loads step 2; nothing runs. A
    later save at a crafted folder's step stops with what to do, and the folder survives byte for byte."""
    marker = tmp_path / "ran"
    local = copy_run(reference, tmp_path / "planted")
    for n in (5, 6, 7):
        shutil.copytree(reference / step(4), local / step(n))
    refused = {n: craft(local / step(n), kind, marker) for n, kind in zip((4, 5, 6, 7), KINDS)}
    url = upload(store, local, "run")  # the store's checkpoint.dir for the run "run"
    before = tree(store, url)
    recipe = write_recipe(tmp_path, *RECIPE)
    r, _ = launch(tmp_path, recipe, "trainer.max_steps=3", store=store)
    out = r.stdout + r.stderr
    for n, name in refused.items():
        assert re.search(rf"resume: skipped \S+{step(n)}: \S+{step(n)}/.metadata (refers to the Python global "
                         rf"|names the data file ){re.escape(name)}", out), out
    assert "; the folder is left in place, and a save at step 4 will stop with an error until it is moved away" \
        in out, out
    assert re.search(rf"resume: from \S+{step(2)}: step 2", r.stdout), r.stdout
    assert not marker.exists(), "a crafted checkpoint ran code"
    r, _ = launch(tmp_path, recipe, "trainer.max_steps=4", store=store, expect=1)  # saves at step 4: a crafted one
    assert re.search(rf"checkpoint \S+{step(4)} was not saved: the folder holds a committed checkpoint whose "
                     rf"metadata is refused .*never overwritten or deleted: move it out of ", r.stderr), r.stderr
    assert "the previous committed checkpoint (step 3) is intact" in r.stderr
    after = tree(store, url)
    assert {k: v for k, v in after.items() if step(3) not in k} == before, "a crafted or older checkpoint changed"
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- finetune.init_from

def test_finetune_from_a_crafted_checkpoint_fails_naming_file_and_global(tmp_path, reference):
    """The real `launch` with the payload that runs code on today's reader; every payload through the same reader
    in this process."""
    from launcher import finetune as ft
    from launcher.zoo.models import MLP
    marker = tmp_path / "ran"
    for kind in KINDS:
        ckpt = copy_run(reference, tmp_path / kind)
        refused = craft(ckpt / step(4), kind, marker)
        with pytest.raises(ft.InitError) as e:
            ft.load_initial(MLP(in_features=8, hidden=8, out_features=2), str(ckpt / step(4)))
        assert f"finetune.init_from: {ckpt / step(4)} is not a usable checkpoint: {ckpt / step(4)}/.metadata" \
            in str(e.value) and refused in str(e.value), str(e.value)
        assert not marker.exists(), f"a crafted checkpoint ({kind}) ran code"
    ckpt = tmp_path / "dotted"
    r, _ = launch(tmp_path, write_recipe(tmp_path, *RECIPE), f"finetune.init_from={ckpt / step(4)}",
                  "trainer.max_steps=1", gpus=1, expect=1)
    assert f"{ckpt / step(4)}/.metadata refers to the Python global {MODULE}.os.system" in r.stderr, r.stderr
    assert not marker.exists(), "a crafted checkpoint ran code"


def test_finetune_from_a_directory_passes_over_a_crafted_newest(tmp_path, reference):
    marker = tmp_path / "ran"
    ckpt = copy_run(reference, tmp_path / "pretrained")
    craft(ckpt / step(4), "dotted", marker)
    r, _ = launch(tmp_path, write_recipe(tmp_path, *RECIPE), f"finetune.init_from={ckpt}", "trainer.max_steps=1",
                  gpus=1)
    out = r.stdout + r.stderr
    assert re.search(rf"finetune.init_from: skipped \S+{step(4)}: \S+/.metadata refers to the Python global "
                     rf"{re.escape(MODULE)}.os.system", out), out
    assert f"initialised from {ckpt / step(2)} (step 2): 6 tensors loaded" in out, out
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- launch ckpt export

def export(*args: str, capsys) -> tuple[int, str, str]:
    """`launch ckpt export ARGS` in this process (the command line's own parser and code)."""
    from launcher.cli import main
    code = main(["ckpt", "export", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_of_a_crafted_checkpoint_fails_naming_file_and_global(tmp_path, reference, capsys):
    marker = tmp_path / "ran"
    for kind in KINDS:
        ckpt = copy_run(reference, tmp_path / kind)
        refused = craft(ckpt / step(4), kind, marker)
        code, _, err = export(str(ckpt / step(4)), str(tmp_path / "out.pt"), capsys=capsys)
        assert code == 2, err
        assert f"cannot be exported: {ckpt / step(4)}/.metadata" in err and refused in err, err
        assert not marker.exists() and not (tmp_path / "out.pt").exists(), kind
    r = run_launch("ckpt", "export", str(tmp_path / "dotted" / step(4)), str(tmp_path / "out.pt"), cwd=tmp_path)
    assert r.returncode == 2 and f"refers to the Python global {MODULE}.os.system" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_export_of_a_directory_takes_its_newest_good_checkpoint(tmp_path, reference, capsys):
    ckpt = copy_run(reference, tmp_path / "ck")
    code, out, err = export(str(ckpt), str(tmp_path / "newest.pt"), capsys=capsys)
    assert code == 0, err
    assert f"from {ckpt / step(4)} (step 4)" in out
    (ckpt / step(4) / "__1_0.distcp").write_bytes(b"short")  # a damaged newest: passed over with a warning
    craft(ckpt / step(2), "outside", tmp_path / "ran")  # ... and a crafted one: also passed over
    shutil.copytree(reference / step(2), ckpt / step(1))
    code, out, err = export(str(ckpt), str(tmp_path / "older.pt"), capsys=capsys)
    assert code == 0, err
    assert re.search(rf"skipped \S+{step(4)}: \S+__1_0.distcp has 5 bytes, the manifest says \d+", err), err
    assert re.search(rf"skipped \S+{step(2)}: \S+/.metadata refers to the Python global posix.system", err), err
    assert f"from {ckpt / step(1)} (step 1)" in out
    listing = run_launch("ckpt", "ls", str(ckpt), cwd=tmp_path)  # resume's view: the crafted one is not usable
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:-1]}
    assert "REFUSED:" in rows["2"] and "posix.system" in rows["2"], listing.stdout
    assert "committed, latest" in rows["1"] and "NOT COMMITTED:" in rows["4"], listing.stdout
    got, want = torch.load(tmp_path / "older.pt", weights_only=True), checkpoint_params(reference / step(2))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    (ckpt / step(1) / "manifest.json").unlink()
    code, _, err = export(str(ckpt), str(tmp_path / "none.pt"), capsys=capsys)
    assert code == 2 and "nor a directory with a committed checkpoint (3 step folder(s) passed over" in err, err
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------------------------- safetensors

def test_safetensors_export_round_trips(tmp_path, store, reference, capsys):
    from safetensors.torch import load_file
    url = upload(store, reference, "ck")
    want = checkpoint_params(reference / step(4))
    out = tmp_path / "model.safetensors"
    r = run_launch("ckpt", "export", url, str(out), cwd=tmp_path, env=launch_env(**store.env))
    assert r.returncode == 0, r.stderr
    assert f"{step(4)} (step 4) to {out} (safetensors)" in r.stdout
    code, stdout, err = export(str(reference), str(tmp_path / "weights.bin"), "--format", "safetensors",
                               capsys=capsys)
    assert code == 0 and "(safetensors)" in stdout, err
    for got in (load_file(out), load_file(tmp_path / "weights.bin")):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_safetensors_writes_tied_and_strided_tensors_as_copies():
    from safetensors.torch import load

    from launcher.checkpoint import tools
    w = torch.arange(12.0).reshape(3, 4)
    state = {"embed.weight": w, "head.weight": w, "head.t": w.t(), "row": w[1], "empty": torch.empty(0),
             "empty2": torch.empty(0, 3)}
    got = load(tools.safetensors_bytes(state))
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_a_missing_safetensors_package_says_how_to_install_it(tmp_path, reference):
    shim = tmp_path / "shim" / "safetensors"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named safetensors (a test stand-in)')\n")
    env = launch_env()
    env["PYTHONPATH"] = f"{shim.parent}:{env['PYTHONPATH']}"
    r = run_launch("ckpt", "export", str(reference), str(tmp_path / "m.safetensors"), cwd=tmp_path, env=env)
    assert r.returncode == 2 and "pip install 'launcher[safetensors]'" in r.stderr, r.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_finetune_from_a_safetensors_file(tmp_path, reference):
    """Hugging Face ships weights as model.safetensors; lr 0 keeps them, so the run's checkpoint must hold them."""
    from launcher.checkpoint import tools
    want = checkpoint_params(reference / step(4))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(tools.safetensors_bytes(want))
    r, run_dir = launch(tmp_path, write_recipe(tmp_path, *RECIPE), f"finetune.init_from={weights}", "optimizer.lr=0.0",
                        "trainer.max_steps=1", gpus=1)
    assert f"initialised from {weights}: 6 tensors loaded" in r.stdout + r.stderr
    got = checkpoint_params(run_dir / "checkpoints" / step(1))
    assert all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------------------------- credentials

def test_credentials_never_written(tmp_path, s3_server):
    from conftest import Store
    store = Store("s3", tmp_path, s3_server)
    secret = "Sekr3tKeyForThisTestOnly9"
    r, run_dir = launch(tmp_path, write_recipe(tmp_path, *CHECKPOINT_RECIPE), "trainer.max_steps=4", store=store,
                        env={"AWS_SECRET_ACCESS_KEY": secret})
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), f"the secret key leaked into {path}"
    fs = store._fs()
    for key in fs.find(store.url("run")):
        assert secret.encode() not in fs.cat_file(key), f"the secret key leaked into {key}"
    assert secret not in r.stdout + r.stderr
