"""The command line every program in train/ shares (docs/design.md, "Public contract"): --help names
--config, --set and --workdir; a misspelt --set key exits non-zero with one line on stderr naming the
key, before anything else is looked at (a --checkpoint included); a mesh that does not fit the
devices is refused before any work. The programs are found by listing train/*.py (a module with
`if __name__ == "__main__"`), so a new one is held to this as soon as it lands. Everything runs in
this process: each program's `main` under `cli.main`, as `python -m` runs it."""

import glob
import importlib
import os

import pytest

from helpers import REPO, run_main

MISSPELT = "model.num_head=3"  # model.num_heads


def programs() -> list[str]:
    names = []
    for path in sorted(glob.glob(os.path.join(REPO, "train", "*.py"))):
        with open(path, encoding="utf-8") as f:
            if 'if __name__ == "__main__"' in f.read():
                names.append(os.path.splitext(os.path.basename(path))[0])
    return names


PROGRAMS = programs()


def takes_checkpoint(name: str) -> bool:
    with open(os.path.join(REPO, "train", f"{name}.py"), encoding="utf-8") as f:
        return "checkpoint=" in f.read()  # cli.parser(..., checkpoint="help") adds --checkpoint


def run(name: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m train.<name> <argv>`, in process."""
    return run_main(importlib.import_module(f"train.{name}"), argv, monkeypatch, capsys)


def test_the_programs_are_found():
    assert {"pretrain", "pretrain_itm", "finetune", "translate", "visualize", "convert", "bench", "prepare"} <= set(
        PROGRAMS
    )
    assert "cli" not in PROGRAMS and "trainer" not in PROGRAMS


@pytest.mark.parametrize("name", PROGRAMS)
def test_main_runs_under_cli_main(name):
    """`python -m train.<name>` is `cli.main(main)`: its mistakes become one line and exit 2."""
    module = importlib.import_module(f"train.{name}")
    assert callable(getattr(module, "main", None)), f"train/{name}.py has no main()"
    with open(module.__file__, encoding="utf-8") as f:
        assert "cli.main(main)" in f.read().split('if __name__ == "__main__"', 1)[1], name


@pytest.mark.parametrize("name", PROGRAMS)
def test_help_names_the_shared_flags(name, monkeypatch, capsys):
    code, out, _ = run(name, ["--help"], monkeypatch, capsys)
    assert code == 0
    for flag in ("--config", "--set", "--workdir"):
        assert flag in out, f"train.{name} --help does not name {flag}"


@pytest.mark.parametrize("name", PROGRAMS)
def test_a_misspelt_key_is_one_line_naming_it(name, monkeypatch, capsys, tmp_path):
    code, _, err = run(name, ["--set", MISSPELT, "--workdir", str(tmp_path / "w")], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and "model.num_head" in lines[0], (name, code, err)
    assert not os.path.exists(tmp_path / "w"), f"train.{name} wrote its workdir before refusing the key"


@pytest.mark.parametrize("name", [n for n in PROGRAMS if takes_checkpoint(n)])
def test_a_misspelt_key_comes_before_the_checkpoint(name, monkeypatch, capsys, tmp_path):
    """Where a program takes --checkpoint, the key is refused before the checkpoint is looked at."""
    _, out, _ = run(name, ["--help"], monkeypatch, capsys)
    assert "--checkpoint" in out
    code, _, err = run(name, ["--checkpoint", str(tmp_path / "nowhere"), "--set", MISSPELT], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and "model.num_head" in lines[0], (name, code, err)


@pytest.mark.parametrize("name", ["pretrain", "pretrain_itm", "finetune", "translate", "bench"])
def test_a_mesh_that_does_not_fit_is_refused_before_any_work(name, monkeypatch, capsys, tmp_path):
    """The tests see 8 devices: data=3 fits none of them. Refused right after the config is read: no
    tokenizer trained, no data read, nothing compiled (the workdir is never made)."""
    workdir = tmp_path / "w"
    args = ["--set", "mesh.data=3", "--workdir", str(workdir)]
    code, _, err = run(name, args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: mesh: data*fsdp*sequence*tensor = 3"), (
        name,
        err,
    )
    assert not workdir.exists()
