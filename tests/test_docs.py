"""The documentation runs, and points only inside the repository.

Every ```bash cpu``` block of README.md and docs/*.md runs, page by page (one test per page, so a
failure names the page): a page's blocks in order, each command (a line ending in `\\` continues it)
in `bash` from the repository root, with `runs/` rewritten to a temporary directory (nothing is
written into the repository) and every training run cut to CPU size (`cpu_sized`: two steps, and
no eval unless the command names `train.eval_every` itself: a page that reads the eval a run
logs says so, e.g. `--set train.eval_every=20`, and gets it at the last step). A page may use the
workdirs its earlier commands made, never another page's. Blocks fenced
```bash without `cpu` are shown, not run (pod launches, GPU benches, TFDS data the user prepares);
their programs, flags and --set keys are still checked against the code, as are the command lines
in the docstrings of train/*.py.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re
import resource
import shlex
import subprocess
import sys

import pytest

from helpers import FAST_COMPILE, REPO

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
# the workflow pages: each must run something on a CPU and be linked from the README
WORKFLOW_PAGES = ("pretrain", "finetune", "translate", "image_text", "convert", "generate", "evaluate")
# training programs: every run of theirs in a cpu block runs CPU_STEPS steps (whatever the page says)
# and, unless the command names train.eval_every, no eval (an eval is a compile and, for
# translation, a beam search over the dev set: seconds of CPU each)
TRAINING_PROGRAMS = ("pretrain", "pretrain_itm", "finetune", "translate")
CPU_STEPS = 2
# flags that make a training program run for minutes whatever train.steps says
TOO_SLOW = {"translate": ("--bench",), "pretrain_itm": ("--bench",), "finetune": ("--compare-scratch",)}

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
PROGRAM = re.compile(r"\bpython -m train\.(\w+)")


def read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def quotes_open(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
        return False
    except ValueError:  # no closing quotation
        return True


def commands(block: str) -> list[str]:
    """The commands of a shell block: a line ending in `\\` continues, so does one inside an open
    quote (a multi-line `python -c "..."`); comment-only lines drop out."""
    out, current = [], ""
    for line in block.splitlines():
        if not current and line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if quotes_open(current):
            current += "\n"
            continue
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    if current.strip():
        out.append(current.strip())
    return out


def cpu_commands(page: str) -> list[str]:
    return [c for info, body in fenced_blocks(read(page)) if info.split() == ["bash", "cpu"] for c in commands(body)]


def docstrings() -> dict[str, str]:
    """{train/<name>.py: its module docstring}."""
    out = {}
    for path in sorted(glob.glob(os.path.join(REPO, "train", "*.py"))):
        with open(path, encoding="utf-8") as f:
            out[os.path.relpath(path, REPO)] = ast.get_docstring(ast.parse(f.read())) or ""
    return out


def docstring_commands() -> dict[str, list[str]]:
    """{train/<name>.py: the command lines of its module docstring: lines that start with
    `python -m train.`, and the lines they continue onto with `\\`}."""
    out = {}
    for module, doc in docstrings().items():
        found, current = [], None
        for line in doc.splitlines():
            line = line.strip()
            if current is None and not line.startswith("python -m train."):
                continue
            current = (current or "") + line.rstrip("\\") + " "
            if not line.endswith("\\"):
                found.append(current.strip())
                current = None
        out[module] = found
    return out


def cpu_sized(command: str, runs: str) -> str:
    """The command as the test runs it: `runs/` moved to `runs`, and a training program's run (train
    mode of train.translate) cut to CPU size: `train.steps` set right after the program's name and
    the page's own value replaced; `train.eval_every=0` too where the command does not name it."""
    command = re.sub(r"(?<![\w./$~-])runs/", runs.rstrip("/") + "/", command)
    m = PROGRAM.search(command)
    if not m or m.group(1) not in TRAINING_PROGRAMS:
        return command
    program = m.group(1)
    slow = [f for f in TOO_SLOW.get(program, ()) if re.search(rf"(?<!\S){f}(?![\w-])", command)]
    assert not slow, f"{slow[0]} runs for minutes whatever train.steps says: fence it ```bash, not ```bash cpu"
    if program == "translate" and re.search(r"(?<!\S)--checkpoint\b", command):
        return command  # translate mode: nothing trains
    command = re.sub(r"(?<=[\s'\"=])train\.steps=[^\s'\"]*", f"train.steps={CPU_STEPS}", command)
    sets = f"--set train.steps={CPU_STEPS}"
    if not re.search(r"(?<=[\s'\"=])train\.eval_every=", command):
        sets += " --set train.eval_every=0"
    return command[: m.end()] + " " + sets + command[m.end() :]


def tail(text: str, lines: int = 25) -> str:
    kept = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def listing(path: str) -> set[str]:
    return set(os.listdir(path)) if os.path.isdir(path) else set()


@pytest.fixture(scope="module")
def program_env(tmp_path_factory):
    """The programs' environment: this interpreter first on PATH (the pages say `python`), one CPU
    device, and compiles made cheap. XLA's compile dominates a two-step run on a CPU: optimisation
    level 0 roughly halves it (the step runs slower; this test checks that the commands work, not
    their speed or figures), and a compilation cache shared by the pages serves the same tiny
    model trained on two pages once."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = FAST_COMPILE
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


RUNNABLE = [p for p in PAGES if cpu_commands(p)]


@pytest.mark.parametrize("page", RUNNABLE)
@pytest.mark.slow
def test_page_runs(page, tmp_path, program_env):
    todo = cpu_commands(page)
    runs = str(tmp_path / "runs")
    assert not re.search(r"\s", runs), runs
    os.makedirs(runs)
    before = (listing(REPO), listing(os.path.join(REPO, "runs")))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    for number, command in enumerate(todo, 1):
        run = cpu_sized(command, runs)
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", run],
            cwd=REPO,
            env=program_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            pytest.fail(
                f"{page}, command {number} exited {result.returncode}:\n  {command}\nrun as:\n  {run}\n"
                f"--- last lines of stderr ---\n{tail(result.stderr) or tail(result.stdout)}",
                pytrace=False,
            )
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{page}: {len(todo)} commands, {used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:.1f} s CPU")
    after = (listing(REPO), listing(os.path.join(REPO, "runs")))
    written = sorted(after[0] - before[0]) + sorted(f"runs/{n}" for n in after[1] - before[1])
    assert not written, f"{page} wrote into the repository: {written} (give every run a --workdir under runs/)"


def test_cpu_sized():
    run = cpu_sized(
        "python -m train.pretrain --config configs/bert_tiny.yaml --workdir runs/b --set train.steps=300", "/t/runs"
    )
    assert run == (
        "python -m train.pretrain --set train.steps=2 --set train.eval_every=0 --config "
        "configs/bert_tiny.yaml --workdir /t/runs/b --set train.steps=2"
    )
    assert (
        cpu_sized("echo hi | python -m train.translate --checkpoint runs/t --beam 2", "/t/runs")
        == "echo hi | python -m train.translate --checkpoint /t/runs/t --beam 2"
    )
    assert (
        cpu_sized("python -m train.translate --workdir runs/t --set train.eval_every=20", "/t/runs")
        == "python -m train.translate --set train.steps=2 --workdir /t/runs/t --set train.eval_every=20"
    )
    assert (
        cpu_sized("python -m train.convert --from-hf runs/h --workdir runs/w", "/t/runs")
        == "python -m train.convert --from-hf /t/runs/h --workdir /t/runs/w"
    )
    with pytest.raises(AssertionError, match="--compare-scratch"):
        cpu_sized("python -m train.finetune --compare-scratch", "/t/runs")
    assert commands("a \\\n  b\n# the run's\nd  # e's\npython -c \"\nx = 'y'\n# z\n\"\n") == [
        "a    b",
        "d  # e's",
        "python -c \"\nx = 'y'\n# z\n\"",
    ]


def test_workflow_pages_run_on_a_cpu():
    readme = read("README.md")
    for name in WORKFLOW_PAGES:
        page = f"docs/{name}.md"
        assert os.path.isfile(os.path.join(REPO, page)), f"{page} is missing"
        assert cpu_commands(page), f"{page} has no ```bash cpu``` block"
        assert f"]({page})" in readme, f"README.md does not link {page}"


# ----------------------------------------------------------------------------- links and paths
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
# a path that climbs: `../x`, `a/../../x`
CLIMB = re.compile(r"(?<![\w.])[\w./~-]*\.\./[^\s`'\")\]]*")
# a path into the repository's own folders: ends in a file name with an extension or in `/`
REPO_PATH = re.compile(
    r"(?<![\w./$~{<-])((?:transformer_jax|train|configs|docs|tests)/(?:[\w*-]+/)*"
    r"(?:[\w*-]+\.[A-Za-z][\w*]*)?)(?![\w/-])"
)


def inside(path: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, os.path.realpath(REPO)]) == os.path.realpath(REPO)


def test_no_link_leaves_the_repository():
    """Every Markdown link of README.md and docs/*.md is a file or folder of the repository, relative
    to the page (no http(s) link either: a page of this repository is read where it is checked out,
    perhaps offline, and an external page changes without this test seeing it); and no path in them
    or in the docstrings of train/*.py climbs out of the repository (`../shared/...`). Commands run
    from the repository root, so a path in a code block climbs from there."""
    problems = []
    for page in PAGES:
        text = read(page)
        prose = INLINE_CODE.sub("", FENCE.sub("", text))
        base = os.path.dirname(os.path.join(REPO, page))
        for target in LINK.findall(prose):
            path = target.split("#", 1)[0]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
                problems.append(f"{page}: [..]({target}) leaves the repository")
            elif path.startswith("/"):
                problems.append(f"{page}: [..]({target}) is an absolute path")
            elif path and not inside(os.path.join(base, path)):
                problems.append(f"{page}: [..]({target}) climbs out of the repository")
            elif path and not os.path.exists(os.path.join(base, path)):
                problems.append(f"{page}: [..]({target}) does not exist")
        in_code = [b for _, b in fenced_blocks(text)]
        spans = [s.strip("`") for s in INLINE_CODE.findall(FENCE.sub("", text))]
        for where, chunks, root in (("a code block", in_code, REPO), ("inline code", spans, base)):
            for chunk in chunks:
                for path in CLIMB.findall(chunk):
                    if not inside(os.path.join(root, path)):
                        problems.append(f"{page}: {path} ({where}) climbs out of the repository")
    for module, doc in docstrings().items():
        for path in CLIMB.findall(doc):
            if not inside(os.path.join(REPO, path)):
                problems.append(f"{module} docstring: {path} climbs out of the repository")
    assert not problems, "\n".join(problems)


def test_named_files_exist():
    """A file or folder of the repository named in README.md, docs/*.md or a docstring of train/*.py
    (`configs/t5_tiny.yaml`, `transformer_jax/tasks/`, `docs/*.md`) exists: a rename shows here."""
    texts = {page: read(page) for page in PAGES} | docstrings()
    missing = []
    for where, text in texts.items():
        for path in REPO_PATH.findall(text):
            full = os.path.join(REPO, path)
            if not (glob.glob(full) if "*" in path else os.path.exists(full)):
                missing.append(f"{where}: {path}")
    assert not missing, "named but not in the repository:\n" + "\n".join(missing)


def program_flags(name: str) -> set[str]:
    """The --flags train/<name>.py defines (string literals), with those every program takes (cli.py)."""
    flags = set()
    for path in (os.path.join(REPO, "train", f"{name}.py"), os.path.join(REPO, "train", "cli.py")):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        flags |= {
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"--[a-z][\w-]*", n.value)
        }
    return flags


def config_key_problem(key: str) -> str | None:
    from transformer_jax.config import Config

    section, _, field = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if section not in fields:
        return f"no config section {section!r}"
    if not field:
        return None
    sub = fields[section].default_factory() if fields[section].default_factory is not dataclasses.MISSING else None
    if sub is None or not dataclasses.is_dataclass(sub):
        return f"{section} is not a section"
    if field not in {f.name for f in dataclasses.fields(sub)}:
        return f"no key {field!r} in {section}"
    return None


def row_option_problem(key: str) -> str | None:
    """train.results' --set names an option of a row (train/result_rows.py), not a config key."""
    from train.result_rows import ROWS

    return None if any(key in row.options for row in ROWS.values()) else "no row of train.results has this option"


@pytest.mark.slow
def test_documented_commands_exist():
    """Every `python -m train.<name>` in a bash block of README.md or docs/*.md, run or only shown, and
    in a docstring of train/*.py names a program that exists, with flags it defines and --set keys
    the config has."""
    sources = {}
    for page in PAGES:
        sources[page] = [
            c for info, body in fenced_blocks(read(page)) if info.split()[:1] == ["bash"] for c in commands(body)
        ]
    sources.update(docstring_commands())
    problems = []
    for where, lines in sources.items():
        for line in lines:
            try:
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split, lexer.commenters = True, "#"
                tokens = list(lexer)
            except ValueError as e:
                problems.append(f"{where}: {line}: {e}")
                continue
            segments, current = [], []
            for token in tokens:
                if token and set(token) <= set("|&;<>()"):
                    segments.append(current)
                    current = []
                else:
                    current.append(token)
            segments.append(current)
            for seg in segments:
                if seg[:2] != ["python", "-m"] or len(seg) < 3 or not re.fullmatch(r"train\.\w+", seg[2]):
                    continue
                name = seg[2][len("train.") :]
                if not os.path.isfile(os.path.join(REPO, "train", f"{name}.py")):
                    problems.append(f"{where}: {line}: no program train/{name}.py")
                    continue
                flags = program_flags(name)
                for i, token in enumerate(seg[3:], 3):
                    flag = token.lstrip("[").rstrip("]").split("=", 1)[0]
                    if re.fullmatch(r"--[a-z][\w-]*", flag) and flag not in flags:
                        problems.append(f"{where}: {line}: train.{name} has no flag {flag}")
                    if flag in ("--set", "--pretrain-set") and i + 1 < len(seg) and "=" in seg[i + 1]:
                        key = seg[i + 1].split("=", 1)[0]
                        problem = re.fullmatch(r"[\w.]+", key) and (
                            row_option_problem(key) if name == "results" else config_key_problem(key)
                        )
                        if problem:
                            problems.append(f"{where}: {line}: --set {key}: {problem}")
    assert not problems, "\n".join(problems)
