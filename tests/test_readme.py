"""The README as a test: every command it shows is run here, from its own text, or skipped with a reason.

Commands are read from README.md: every line of a ```bash block (``\\`` continuations joined,
``# comments`` dropped) and every inline code span that is a command (``mlcd X --flag ...``,
``torchrun ...``, ``make X``, ``python ...``, a ``key=value`` override list).  Each one must match
a rule of ``RULES`` below: a rule runs it (in README order within its phase, in one sandbox
folder that holds the shipped sample, so later commands read what earlier ones wrote) or skips
it with the reason.  A command no rule knows fails ``test_every_readme_command_has_a_rule``:
a new README command cannot go untested.

**The one place that changes a README command** is ``SUBSTITUTIONS`` (placeholders of the
README -> what exists in the sandbox, applied to every command) and the ``subs`` / ``extra`` of
a rule (per command: an output folder of its own where the README reuses one, small step counts
where the README trains for minutes).  Everything else runs as written: ``mlcd`` commands
through ``mlcd_train.cli.main`` (the ``mlcd`` console script's entry point) in this process,
the rest (``torchrun``, ``python``) through bash, with this venv's ``bin`` first on PATH.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# README placeholder -> what the test runs instead (every command; in this order).
SUBSTITUTIONS = {
    "/data/images": "data/images",        # an image folder the sandbox holds (3 classes, 24 PNGs)
    "/data/shards": "data/shards",
    "runs/exp1": "runs/tiny",             # "a training run": the README's own `mlcd train` output
    "tools/": f"{ROOT}/tools/",           # repository scripts, run from the sandbox
    "configs/": f"{ROOT}/configs/",
    "--nproc_per_node 8": "--nproc_per_node 2",          # 2 gloo ranks on the CPU
    "--k 1000000": "--k 64", "--k 100000": "--k 64",     # k sized to the 3,000-image sample
    "--image_size 224": "--image_size 28",   # the sample's student is 28 px (224/336: the paper's towers)
    "--image_size 336": "--image_size 28",
    "SHARDS": "shards/train",             # `eval.train=SHARDS eval.test=SHARDS`
    "every=N": "every=10",
}
# appended to every training command: the README's presets train for minutes
SHORT_TRAIN = ["train.steps=4"]
# appended to the probes: a short L-BFGS sweep (the README's full one takes minutes on 2 cores)
SHORT_PROBE = ["--l2-grid", "0.001", "--max-iter", "50"]


@dataclass
class Rule:
    pattern: str                  # regex, matched at the start of the README command
    phase: int = 0                # run order: phase, then README order
    subs: dict = field(default_factory=dict)   # this command only: README text -> run text
    extra: list = field(default_factory=list)  # appended arguments
    skip: str | None = None       # the reason it is not run here
    check: str | None = None      # "print-config": a key=value list, checked through --print-config


GPU = "needs GPUs (and weights or a corpus the sample cannot stand in for)"
RULES = [
    # -------------------------------------------------------------- not run here, and why
    Rule(r"make (demo|install)$", skip="creates .venv and installs (network); `make demo` runs "
                                        "`mlcd demo --out demo_out`, whose --quick form runs below"),
    Rule(r"make (test|test-fast)$", skip="this suite (CI runs it: .ci/run)"),
    Rule(r"make bench$", skip="the benchmarks: minutes to hours on 2 cores"),
    Rule(r"pip install ", skip="installs packages (network)"),
    Rule(r"apt-get install ", skip="system package (root, network)"),
    Rule(r"source \.venv/bin/activate", skip="changes the calling shell only"),
    Rule(r"tensorboard --logdir", skip="starts a server that runs until stopped"),
    Rule(r"python -m bench\.run_all", skip="the benchmarks: minutes to hours; `make bench`"),
    Rule(r"python tools/reproduce_fashion_mnist\.py --work ",
         skip="the Fashion-MNIST reproduction: 74 minutes on 2 cores; tests/test_tools_hostile.py and "
              "test_launch_env.py drive its checks and preparation"),
    Rule(r"mlcd embed .*--model (open_clip:|hf:/models/)", skip="needs downloaded teacher weights"),
    Rule(r"mlcd convert --from-hf /models/", skip="needs a downloaded Hugging Face model"),
    Rule(r"torchrun --nproc_per_node 8 -m mlcd_train\.train --config vit_b32_paper",
         skip=f"ViT-B/32 at batch 32K on 8 ranks: {GPU}; the torchrun form is run in Faults"),
    Rule(r"mlcd pipeline --config", skip="2 rounds x 300 steps of the example: minutes; tests/test_pipeline "
                                         "covers the command"),
    Rule(r"mlcd demo --out demo_out$", skip="the full demo (600 steps, about 4 minutes); its --quick form runs"),
    # names of an option or the start of a command in prose, not a command to run
    Rule(r"(mlcd (shards --input|assign --approx|assign --backend torch|cluster --backend torch|"
         r"embed --model mlcd:(…|runs/exp1 …)|assign --centroids OLD/cl/centroids\.npy|"
         r"export --checkpoint OUT/best|convert --from-hf)|tensorboard --logdir|torchrun -m mlcd_train\.train)$",
         skip="an option or a command named in prose (its full command is in a block)"),
    # -------------------------------------------------------------- run
    Rule(r"mlcd (--help|STAGE --help|\w+ --help)$", phase=0),
    Rule(r"[a-z_]+(\.[a-z_]+)+=", phase=0, check="print-config"),
    Rule(r"mlcd shards --input list\.tsv", phase=0, subs={"--out shards": "--out shards_tsv"}),
    Rule(r"mlcd shards --input sample ", phase=0),
    Rule(r"mlcd shards ", phase=0),
    Rule(r"mlcd embed .*--model mlcd:", phase=5, subs={"--out emb": "--out emb_student"}),
    Rule(r"mlcd embed ", phase=1),
    Rule(r"torchrun .*-m clustering\.embed", phase=1,
         subs={"--shards ...": "--shards shards", "--out ...": "--out emb_torchrun",
               "--model ...": "--model pca --dim 64"}),
    Rule(r"mlcd cluster .*--method two-level", phase=2, subs={"--out cl": "--out cl_two_level"}),
    Rule(r"mlcd cluster ", phase=2),
    Rule(r"torchrun .*-m clustering\.kmeans", phase=2, subs={"--out cl": "--out cl_distributed"}),
    Rule(r"mlcd assign .*--threshold", phase=3, subs={"--out lbl": "--out lbl_threshold"}),
    Rule(r"mlcd assign .*--target-recall", phase=3, subs={"--out lbl": "--out lbl_recall"}),
    Rule(r"mlcd assign .*--approx", phase=3, subs={"--out lbl": "--out lbl_approx"}),
    Rule(r"mlcd assign ", phase=3),
    Rule(r"mlcd train ", phase=4, extra=SHORT_TRAIN),
    Rule(r"torchrun .*-m mlcd_train\.train", phase=4, extra=SHORT_TRAIN),
    Rule(r"mlcd export ", phase=5),
    Rule(r"mlcd convert --checkpoint_path", phase=5),
    Rule(r"python tools/convert_to_hf\.py", phase=5, subs={"hf_vit": "hf_vit_script"}),
    Rule(r"mlcd probe ", phase=6, extra=SHORT_PROBE),
    Rule(r"mlcd demo --out demo_out --quick$", phase=7,
         extra=["--steps", "4", "--train-images", "600", "--test-images", "200"]),
]

_COMMAND_WORD = re.compile(r"(mlcd|torchrun|python|make|pip|apt-get|tensorboard|sbatch|source)\s+\S")
_OVERRIDES = re.compile(r"[a-z_]+(\.[a-z_]+)+=\S")
_STAGE_NAME = re.compile(r"mlcd [a-z]+$")       # `mlcd train` in prose names a stage


@dataclass
class Command:
    text: str        # as the README writes it (continuations joined, comment dropped)
    line: int        # README line
    inline: bool     # an inline code span (prose) rather than a block line


def readme_commands(text: str) -> tuple[list[Command], list[str]]:
    """(commands, problems): every command of the README text; a problem is a block line that
    looks like a command in a block not tagged bash (it would not be tested)."""
    cmds, problems = [], []
    block, lang, pending, start = False, "", "", 0
    for no, raw in enumerate(text.splitlines(), 1):
        if raw.lstrip().startswith("```"):
            block, lang = (not block), raw.strip()[3:].strip().lower()
            continue
        if block:
            if lang in ("bash", "sh", "shell", "console"):
                line = raw.strip()
                if not pending:
                    start = no
                if line.endswith("\\"):
                    pending += line[:-1] + " "
                    continue
                line = _drop_comment(pending + line)
                pending = ""
                if line:
                    cmds.append(Command(re.sub(r"\s+", " ", line), start, False))
            elif re.match(r"(\$ )?(mlcd|torchrun|make|python) -?\w", raw):
                problems.append(f"README line {no}: {raw.strip()!r} looks like a command in a ```{lang} block; "
                                "tag the block ```bash to have it tested")
            continue
        for span in re.findall(r"`([^`]+)`", raw):
            span = span.strip()
            if (_COMMAND_WORD.match(span) and not _STAGE_NAME.match(span)) or _OVERRIDES.match(span):
                cmds.append(Command(span, no, True))
    return cmds, problems


def _drop_comment(line: str) -> str:
    """The line without its shell comment (a ``#`` at a word start, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def rule_for(cmd: Command) -> Rule | None:
    return next((r for r in RULES if re.match(r.pattern, cmd.text)), None)


def as_run(cmd: Command, rule: Rule) -> str:
    """The command the test runs for a README command."""
    text = cmd.text
    for old, new in rule.subs.items():
        text = text.replace(old, new)
    for old, new in SUBSTITUTIONS.items():
        text = text.replace(old, new)
    if rule.check == "print-config":
        text = f"mlcd train --config fashion_mnist_tiny {text} --print-config"
    if rule.extra:
        text += " " + " ".join(rule.extra)
    return text


def plan(text: str) -> tuple[list[tuple[Command, Rule]], list[str]]:
    """(README command, rule) pairs in run order, and the problems (commands no rule knows)."""
    cmds, problems = readme_commands(text)
    pairs = []
    for c in cmds:
        r = rule_for(c)
        if r is None:
            problems.append(f"README line {c.line}: no rule in tests/test_readme.py RULES runs or skips "
                            f"{c.text!r}")
        else:
            pairs.append((c, r))
    pairs.sort(key=lambda p: (p[1].phase, p[0].line))
    return pairs, problems


# ----------------------------------------------------------------------------- running

def run_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_command(text: str, cwd: Path, timeout: float = 900) -> tuple[int, str]:
    """Run one command in ``cwd``; (exit status, output).  ``mlcd ...`` without shell syntax
    runs in this process through the console script's entry point; anything else through bash."""
    if text.startswith(("mlcd ", "mlcd\t")) and not re.search(r"[|&;<>$`]", text):
        from mlcd_train.cli import main

        argv = shlex.split(text)[1:]
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", write_through=True)  # has .buffer
        old = Path.cwd()
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    rc = main(argv)
                except SystemExit as exc:  # argparse: --help, bad flags
                    rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
                except Exception:  # noqa: BLE001 - a crash is this command's failure, the others still run
                    traceback.print_exc()
                    rc = 1
        finally:
            os.chdir(old)
        return int(rc or 0), raw.getvalue().decode("utf-8", "replace")
    p = subprocess.run(["bash", "-c", text], cwd=cwd, env=run_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return p.returncode, p.stdout


def expand(text: str) -> list[str]:
    """`mlcd STAGE --help` stands for every stage."""
    if "STAGE" in text:
        from mlcd_train.cli import STAGES

        return [text.replace("STAGE", s) for s in STAGES]
    return [text]


def check_print_config(cmd: Command, output: str) -> str | None:
    """Each key=value of the README's list must show in the resolved config."""
    import yaml

    cfg = yaml.safe_load(output)
    tokens = shlex.split(as_run(cmd, Rule("", check=None)))  # the list itself, substituted
    for tok in tokens:
        key, _, value = tok.partition("=")
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return f"{key} is not in the resolved config"
            node = node[part]
        want = yaml.safe_load(value)
        if isinstance(want, dict) and isinstance(node, dict):
            if any(node.get(k) != v for k, v in want.items()):
                return f"{key}: resolved {node!r}, README sets {want!r}"
        elif node != want and str(node) != str(want) and not _same_number(node, want):
            return f"{key}: resolved {node!r}, README sets {want!r}"
    return None


def _same_number(a, b) -> bool:
    """5e-4 (a string to YAML 1.1) and 0.0005 are the same value."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def run_readme(pairs, cwd: Path) -> list[str]:
    """Run every planned command; one failure report per command that failed."""
    failures = []
    done: set[str] = set()
    for cmd, rule in pairs:
        if rule.skip:
            continue
        for text in expand(as_run(cmd, rule)):
            if text in done:
                continue
            done.add(text)
            t0 = time.monotonic()
            rc, out = run_command(text, cwd)
            print(f"[{time.monotonic() - t0:5.1f} s] rc {rc}  {text}", flush=True)
            problem = None if rc == 0 else f"exit status {rc}"
            if problem is None and rule.check == "print-config":
                problem = check_print_config(cmd, out)
            if problem:
                failures.append(f"README line {cmd.line}: {cmd.text}\n  ran: {text}\n  {problem}\n"
                                + "\n".join("    " + ln for ln in out.strip().splitlines()[-15:]))
    return failures


def make_sandbox(root: Path) -> Path:
    """A folder holding what the README's placeholders point at (see SUBSTITUTIONS)."""
    from mlcd_train.data.sample import sample_paths
    from tests.fixtures import make_image_folder

    root.mkdir(parents=True, exist_ok=True)
    make_image_folder(root / "data" / "images", n=24, size=32, num_classes=3)
    for p in sample_paths("train"):            # `--input train-images-idx3-ubyte.gz`, labels beside it
        shutil.copy(p, root / Path(p).name)
    imgs = sorted((root / "data" / "images").rglob("*.png"))
    (root / "list.tsv").write_text("".join(f"{p.relative_to(root)}\t{p.parent.name}\n" for p in imgs))
    return root


# ----------------------------------------------------------------------------- tests

def test_every_readme_command_has_a_rule():
    pairs, problems = plan(README.read_text())
    assert not problems, "\n".join(problems)
    run = [c for c, r in pairs if not r.skip]
    assert len(run) >= 20 and any(r.pattern.startswith("torchrun") for _, r in pairs if not r.skip)


def test_an_unknown_command_fails_the_plan():
    text = README.read_text() + "\n```bash\nmlcd frobnicate --now\n```\n\nthen `torchrun --nnodes 3 -m x`\n"
    _, problems = plan(text)
    assert len(problems) == 2 and "mlcd frobnicate --now" in problems[0] and "--nnodes 3" in problems[1]
    _, problems = plan("```\nmlcd shards --input a --out b\n```\n")
    assert problems and "tag the block ```bash" in problems[0]


def test_block_parsing():
    text = ("```bash\nmlcd a --x 1 \\\n    --y 2   # a comment\n\n# only a comment\nmake demo\n```\n"
            "Prose `mlcd train` names a stage; `mlcd demo --out d` is a command; `a.b=1 c.d=x` overrides.\n")
    cmds, problems = readme_commands(text)
    assert not problems
    assert [(c.text, c.line, c.inline) for c in cmds] == [
        ("mlcd a --x 1 --y 2", 2, False), ("make demo", 6, False), ("mlcd demo --out d", 8, True),
        ("a.b=1 c.d=x", 8, True)]


def _skipped():
    pairs, _ = plan(README.read_text())
    seen, out = set(), []
    for c, r in pairs:
        if r.skip and c.text not in seen:
            seen.add(c.text)
            out.append(pytest.param(c, r.skip, id=f"line{c.line}"))
    return out


@pytest.mark.parametrize("cmd,reason", _skipped())
def test_readme_command_not_run_here(cmd, reason):
    pytest.skip(f"README line {cmd.line}: {cmd.text} -- {reason}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return make_sandbox(tmp_path_factory.mktemp("readme"))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~2 min on an idle 2-core machine; a shared one is much slower
def test_readme_commands_run_as_written(sandbox):
    pairs, problems = plan(README.read_text())
    assert not problems, "\n".join(problems)
    failures = run_readme(pairs, sandbox)
    assert not failures, f"{len(failures)} README command(s) failed:\n\n" + "\n\n".join(failures)


@pytest.mark.slow
def test_a_renamed_flag_fails_the_readme_run(sandbox):
    """What the README test does when code and README drift: the README's `--topk` renamed."""
    pairs, _ = plan(README.read_text())
    cmd, rule = next((c, r) for c, r in pairs if c.text.startswith("mlcd assign ") and "--topk" in c.text)
    renamed = Command(cmd.text.replace("--topk", "--top-k"), cmd.line, cmd.inline)
    failures = run_readme([(renamed, rule)], sandbox)
    assert len(failures) == 1 and "--top-k" in failures[0] and "exit status 2" in failures[0], failures
    assert "unrecognized arguments: --top-k" in failures[0]


def test_print_config_check():
    cmd = Command("optim.lr=5e-4 'model.overrides={pos_embed: rope2d}'", 1, True)
    good = "optim:\n  lr: 0.0005\nmodel:\n  overrides:\n    pos_embed: rope2d\n    width: 8\n"
    assert check_print_config(cmd, good) is None
    assert "optim.lr: resolved 0.001" in check_print_config(cmd, good.replace("0.0005", "0.001"))
    assert "model.overrides" in check_print_config(cmd, good.replace("rope2d", "abs"))
    assert "is not in the resolved config" in check_print_config(Command("optim.lrr=1", 1, True), good)
