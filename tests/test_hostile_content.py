"""Hostile content: what a pull request brings besides the recipe (task folders, model folders, text files).

Each case is refused by `quantkit validate` with the file and line named (the task.yaml line, or the recipe
line that points at a symlink) and a fix; the library refuses it again when validation is skipped or a
file is swapped for a link afterwards. After every case: no marker file was written, and the planted
secret appears in no file under the project (runs/, artifacts/ included) or the store.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from figures import COUNTERS
from quantkit.cli import main
from quantkit.digest import DigestCache
from quantkit.errors import RecipeError, VerificationError
from quantkit.nofollow import SymlinkError
from quantkit.recipe import Calibration, ModelSource, TaskSpec

RECIPE = """\
name: tiny
model:
  path: models/tiny
calibration:
  files: [calibration/calib.txt]
evaluation:
  file: calibration/eval/heldout.txt
  tasks:
    - name: evil
      path: tasks/evil
gguf:
  types: [Q8_0]
"""
LINE = {"model.path": 3, "calibration.files[0]": 5, "evaluation.file": 7, "evaluation.tasks[0]": 9,
        "evaluation.tasks[0].path": 10}

TASK = """\
task: evil
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
ITEMS = '{"question": "The cat sat on the", "choices": ["mat.", "sky."], "answer": 0}\n'


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A project with a model folder, text and a local task; a secret outside it; a store that must stay empty."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    secret = f"QK-PLANTED-SECRET-{uuid.uuid4().hex}"
    outside.mkdir()
    (outside / "secret.txt").write_text(secret + "\n")
    (outside / "dir").mkdir()
    (outside / "dir" / "merges.txt").write_text(secret + "\n")
    (project / "recipes").mkdir(parents=True)
    (project / "recipes" / "r.yaml").write_text(RECIPE)
    (project / "calibration" / "eval").mkdir(parents=True)
    (project / "calibration" / "calib.txt").write_text("Calibration paragraph. " * 10 + "\n")
    (project / "calibration" / "eval" / "heldout.txt").write_text("A different, held-out paragraph. " * 10 + "\n")
    model = project / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (model / "tokenizer.json").write_text("{}")
    (model / "merges.txt").write_text("a b\n")
    (model / "chat_template.jinja").write_text("{{ messages }}")
    task = project / "tasks" / "evil"
    task.mkdir(parents=True)
    (task / "task.yaml").write_text(TASK)
    (task / "items.jsonl").write_text(ITEMS)
    for var in ("QUANTKIT_PROJECT", "QUANTKIT_ALLOW_REMOTE_CODE", "QUANTKIT_ALLOW_PICKLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.chdir(project)
    return SimpleNamespace(root=project, outside=outside, secret=secret, marker=tmp_path / "MARKER",
                           store=tmp_path / "store", recipe=project / "recipes" / "r.yaml", task=task, model=model)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _leaks(world) -> list[str]:
    """Regular files (never followed through a link) under the project and the store that hold the secret."""
    found = []
    for top in (world.root, world.store):
        for dirpath, _, files in os.walk(top, followlinks=False):
            for name in files:
                path = Path(dirpath) / name
                if not path.is_symlink() and world.secret.encode() in path.read_bytes():
                    found.append(str(path))
    return found


def _refused(world, capsys, *, file: str, line: int, where: str, says: str, command: str = "validate") -> str:
    """Run the CLI on the recipe: exit 2, the one expected problem first at ``file:line: where:`` with a fix,
    no traceback, nothing created, no marker, no secret anywhere."""
    before = _listing(world.root)
    code = main([command, str(world.recipe)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": " in ln and ln.split(":")[0].endswith((".yaml", ".yml"))]
    assert code == 2, err
    assert "Traceback" not in err
    prefix = f"{file}:{line}: {where}:" if where else f"{file}:{line}:"
    hit = [ln for ln in lines if ln.startswith(prefix)]
    assert hit, f"expected {prefix!r} in:\n{err}"
    assert says in hit[0] and "(fix: " in hit[0], hit[0]
    assert _listing(world.root) == before, "a refused recipe must create nothing"
    assert not world.store.exists()
    assert not world.marker.exists()
    assert _leaks(world) == []
    COUNTERS["hostile contents refused"] += 1
    return hit[0]


# ---------------------------------------------------------------- local tasks: code through lm-eval

def _with(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


# (id, task.yaml text, needle on the line named, where, what the message says)
TOUCH = "touch {marker}"
TASK_CASES = [
    ("include", TASK + "include: base.yaml\n", "include:", "include", "'include' is not allowed"),
    ("!function process_docs", TASK + "process_docs: !function utils.process_docs\n", "process_docs", "",
     "YAML tag '!function' is not allowed"),
    ("!function doc_to_text", _with(TASK, 'doc_to_text: "{{question}}"', "doc_to_text: !function utils.text"),
     "doc_to_text", "", "YAML tag '!function' is not allowed"),
    ("!!python on a mapping", _with(TASK, "metadata:\n", "metadata: !!python/object:os.system\n"), "metadata",
     "", "YAML tag 'tag:yaml.org,2002:python/object:os.system' is not allowed"),
    ("jinja globals to os.system",
     _with(TASK, 'doc_to_text: "{{question}}"',
           "doc_to_text: \"{{ cycler.__init__.__globals__.os.system('" + TOUCH + "') }}\""),
     "doc_to_text", "doc_to_text", "only plain text around {{field}} references"),
    ("jinja popen in choices",
     _with(TASK, 'doc_to_choice: "{{choices}}"',
           "doc_to_choice: \"{{ lipsum.__globals__['os'].popen('" + TOUCH + "').read() }}\""),
     "doc_to_choice", "doc_to_choice", "only plain text around {{field}} references"),
    ("jinja block in target", _with(TASK, "doc_to_target: answer",
                                    "doc_to_target: \"{% for x in range(10**9) %}{% endfor %}answer\""),
     "doc_to_target", "doc_to_target", "only plain text around {{field}} references"),
    ("jinja filter", _with(TASK, 'doc_to_text: "{{question}}"', 'doc_to_text: "{{question|attr(\'x\')}}"'),
     "doc_to_text", "doc_to_text", "only plain text around {{field}} references"),
    ("jinja global name", _with(TASK, 'doc_to_text: "{{question}}"', 'doc_to_text: "{{ cycler }}"'),
     "doc_to_text", "doc_to_text", "'cycler' is a Jinja name"),
    ("template in target_delimiter", _with(TASK, 'target_delimiter: " "', 'target_delimiter: "{{ x }}"'),
     "target_delimiter", "target_delimiter", "the value may not contain '{'"),
    ("filter_list", TASK + "filter_list:\n  - name: x\n    filter:\n      - function: custom\n", "filter_list",
     "filter_list", "'filter_list' is not allowed"),
    ("process_results", TASK + "process_results: utils.process\n", "process_results", "process_results",
     "'process_results' is not allowed"),
    ("metric from the Hub", _with(TASK, "  - metric: acc\n", "  - metric: evil-metric\n"), "evil-metric",
     "metric_list[0]", "is not a built-in multiple-choice metric"),
    ("hf_evaluate metric",
     _with(TASK, "    higher_is_better: true\n", "    higher_is_better: true\n    hf_evaluate: true\n"),
     "hf_evaluate", "metric_list[0].hf_evaluate", "'hf_evaluate' is not allowed in a metric"),
    ("dataset script", _with(TASK, "dataset_path: json", "dataset_path: evil/dataset-with-a-script"),
     "dataset_path", "dataset_path", "another loader could run a dataset script"),
    ("trust_remote_code in dataset_kwargs",
     _with(TASK, "  data_files:\n", "  trust_remote_code: true\n  data_files:\n"), "trust_remote_code",
     "dataset_kwargs.trust_remote_code", "'trust_remote_code' is not allowed in dataset_kwargs"),
    ("data file climbs out", _with(TASK, "test: items.jsonl", "test: ../../../outside/secret.txt"), "test:",
     "dataset_kwargs.data_files.test", "is not a path inside the task folder"),
    ("data file absolute", _with(TASK, "test: items.jsonl", "test: /etc/passwd"), "test:",
     "dataset_kwargs.data_files.test", "is not a path inside the task folder"),
    ("unknown key", TASK + "description: hello\n", "description", "description", "is not an allowed key"),
    ("another task's name", _with(TASK, "task: evil", "task: arc_easy"), "task:", "task",
     "the recipe asks for 'evil'"),
    ("generate_until", _with(TASK, "output_type: multiple_choice", "output_type: generate_until"),
     "output_type", "output_type", "multiple_choice tasks only"),
    ("anchor and alias", TASK + "x: &doc {a: 1}\ny: *doc\n", "&doc", "",
     "YAML anchors and aliases are not allowed in task files"),
    ("merge key", TASK + "<<: {task: arc_easy}\n", "<<", "", "YAML merge keys (<<) are not allowed in task files"),
]


@pytest.mark.parametrize("what,text,needle,where,says", TASK_CASES, ids=[c[0] for c in TASK_CASES])
def test_task_that_is_not_data_is_refused(world, capsys, what, text, needle, where, says):
    text = text.replace("{marker}", str(world.marker))
    (world.task / "task.yaml").write_text(text)
    # What the include and the !function would pull in, were they followed.
    (world.task / "base.yaml").write_text("process_docs: !function utils.process_docs\n")
    (world.task / "utils.py").write_text(f"import pathlib\npathlib.Path({str(world.marker)!r}).touch()\n"
                                         "def process_docs(ds):\n    return ds\n")
    line = _line_of(text, needle)
    _refused(world, capsys, file="tasks/evil/task.yaml", line=line, where=where, says=says)
    # validation skipped: the step refuses the same line before lm-eval sees anything
    from quantkit.scoring.tasks import resolve_task

    with pytest.raises(RecipeError) as info:
        resolve_task(TaskSpec(name="evil", path="tasks/evil"), root=world.root)
    assert any(p.file.endswith("tasks/evil/task.yaml") and p.line == line for p in info.value.problems)
    assert not world.marker.exists()


def test_task_problems_are_all_reported_with_fixes(world, capsys):
    text = (_with(TASK, 'doc_to_text: "{{question}}"', 'doc_to_text: "{{ self.__init__ }}"')
            + "include: base.yaml\nfilter_list: []\n")
    (world.task / "task.yaml").write_text(text)
    main(["validate", str(world.recipe)])
    err = capsys.readouterr().err.splitlines()
    named = [ln.split(": ")[0] + ": " + ln.split(": ")[1] for ln in err]
    assert named == ["tasks/evil/task.yaml:8: doc_to_text", "tasks/evil/task.yaml:18: include",
                     "tasks/evil/task.yaml:19: filter_list"]
    assert all("(fix: " in ln for ln in err)


def test_default_task_folder_is_checked_too(world, capsys):
    """A task named without ``path`` is read from calibration/tasks/<name>/ when that folder exists."""
    recipe = world.recipe.read_text().replace("      path: tasks/evil\n", "")
    world.recipe.write_text(recipe)
    folder = world.root / "calibration" / "tasks" / "evil"
    folder.mkdir(parents=True)
    (folder / "items.jsonl").write_text(ITEMS)
    (folder / "task.yaml").write_text(TASK + "include: other.yaml\n")
    _refused(world, capsys, file="calibration/tasks/evil/task.yaml", line=18, where="include",
             says="'include' is not allowed")


def test_shipped_local_tasks_are_data(repo_root):
    """The tasks quantkit ships and its tests use pass the allow-list unchanged."""
    from quantkit.scoring.taskconfig import ALLOWED_KEYS, read_task_config

    folders = sorted((repo_root / "calibration" / "tasks").glob("*/")) + sorted(
        (repo_root / "tests" / "data" / "tasks").glob("*/"))
    assert len(folders) >= 5
    for folder in folders:
        raw = (folder / "task.yaml").read_bytes()
        config = read_task_config(raw, file=str(folder / "task.yaml"), name=folder.name, folder=folder)
        assert set(config) <= set(ALLOWED_KEYS)
        original = yaml.safe_load(raw)
        assert {k: v for k, v in config.items() if k != "metric_list"} == \
            {k: v for k, v in original.items() if k != "metric_list"}


def test_lm_eval_gets_the_checked_config_and_copies(world, tmp_path):
    """What lm-eval reads: the allow-listed keys, data files copied from what was digested, its cache beside them."""
    from quantkit.scoring.tasks import _resolved_yaml, resolve_task

    task = resolve_task(TaskSpec(name="evil", path="tasks/evil"), root=world.root)
    dest = tmp_path / "include"
    dest.mkdir()
    _resolved_yaml(task, dest)
    config = yaml.safe_load((dest / "evil.yaml").read_text())
    copy = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert copy.is_relative_to(dest) and copy.read_text() == ITEMS
    assert Path(config["dataset_kwargs"]["cache_dir"]).is_relative_to(dest)
    assert config["doc_to_text"] == "{{question}}" and "include" not in config

    # a data file changed after it was digested is not handed on
    (world.task / "items.jsonl").write_text(ITEMS.replace("mat", "hat"))
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(VerificationError, match="changed since the task was resolved"):
        _resolved_yaml(task, again)


# ---------------------------------------------------------------- symlinks in what a recipe points at

def _link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


# (id, link made (relative to the project) -> target (a callable of the world), recipe file, line, where, says)
LINK_CASES = [
    ("model chat_template.jinja to a secret", "models/tiny/chat_template.jinja", lambda w: w.outside / "secret.txt",
     "model.path", "symlink(s): chat_template.jinja"),
    ("model merges.txt to a secret", "models/tiny/merges.txt", lambda w: w.outside / "secret.txt",
     "model.path", "symlink(s): merges.txt"),
    ("model subfolder to outside", "models/tiny/extra", lambda w: w.outside / "dir",
     "model.path", "symlink(s): extra"),
    ("model folder itself, inside the project", "models/tiny", lambda w: w.root / "models" / "real",
     "model.path", "model folder 'models/tiny' is a symlink"),
    ("task data file to a secret", "tasks/evil/items.jsonl", lambda w: w.outside / "secret.txt",
     "evaluation.tasks[0].path", "has symlink(s): items.jsonl"),
    ("task.yaml to another task.yaml", "tasks/evil/task.yaml", lambda w: w.root / "tasks" / "real" / "task.yaml",
     "evaluation.tasks[0].path", "has symlink(s): task.yaml"),
    ("task folder itself", "tasks/evil", lambda w: w.root / "tasks" / "real",
     "evaluation.tasks[0].path", "task folder 'tasks/evil' is a symlink"),
    ("calibration file inside the project", "calibration/calib.txt", lambda w: w.root / "calibration" / "real.txt",
     "calibration.files[0]", "calibration file 'calibration/calib.txt' is a symlink"),
    ("calibration file to a secret", "calibration/calib.txt", lambda w: w.outside / "secret.txt",
     "calibration.files[0]", "resolves outside the project"),
    ("evaluation file inside the project", "calibration/eval/heldout.txt", lambda w: w.root / "calibration" / "x.txt",
     "evaluation.file", "evaluation file 'calibration/eval/heldout.txt' is a symlink"),
    ("evaluation folder to outside", "calibration/eval", lambda w: w.outside,
     "evaluation.file", "resolves outside the project"),
]


@pytest.mark.parametrize("what,link,target,where,says", LINK_CASES, ids=[c[0] for c in LINK_CASES])
def test_symlink_is_refused_at_the_recipe_line(world, capsys, what, link, target, where, says):
    # harmless targets inside the project, for the links that stay inside it
    (world.root / "models" / "real").mkdir()
    for f in world.model.iterdir():
        (world.root / "models" / "real" / f.name).write_bytes(f.read_bytes())
    (world.root / "tasks" / "real").mkdir()
    (world.root / "tasks" / "real" / "task.yaml").write_text(TASK)
    (world.root / "tasks" / "real" / "items.jsonl").write_text(ITEMS)
    (world.root / "calibration" / "real.txt").write_text("Other calibration text. " * 10 + "\n")
    (world.root / "calibration" / "x.txt").write_text("Other held-out text. " * 10 + "\n")
    (world.outside / "heldout.txt").write_text(world.secret)
    _link(world.root / link, target(world))
    _refused(world, capsys, file="recipes/r.yaml", line=LINE[where], where=where, says=says)


def test_quantkit_run_refuses_before_any_work(world, capsys):
    """`quantkit run` validates too: the symlinked template is named, no store, no run folder."""
    _link(world.model / "chat_template.jinja", world.outside / "secret.txt")
    _refused(world, capsys, file="recipes/r.yaml", line=3, where="model.path", says="chat_template.jinja",
             command="run")
    assert not (world.root / "runs").exists() and not (world.root / "artifacts").exists()


def test_recipe_tag_is_refused_for_the_tag(world, capsys):
    """A !!python tag on a mapping is named as a tag, not lost behind another problem."""
    world.recipe.write_text(RECIPE.replace("model:\n", "model: !!python/object:os.system\n"))
    _refused(world, capsys, file="recipes/r.yaml", line=2, where="", says="YAML tag")


# ---------------------------------------------------------------- validation skipped, or a link swapped in after

def test_steps_refuse_links_without_validation(world):
    """Recipe objects built without the project (no validation) still read nothing through a link."""
    from quantkit.calibration import load_calibration
    from quantkit.graph import _text
    from quantkit.scoring.tasks import resolve_task
    from quantkit.source import fetch_model

    digests = DigestCache(world.root.parent / "digests.json")
    _link(world.model / "chat_template.jinja", world.outside / "secret.txt")
    with pytest.raises(SymlinkError, match="chat_template.jinja"):
        fetch_model(source=ModelSource(path="models/tiny"), root=world.root, digests=digests)
    (world.model / "chat_template.jinja").unlink()

    (world.root / "models" / "linked").symlink_to(world.model)
    with pytest.raises(SymlinkError, match="models/linked is a symlink"):
        fetch_model(source=ModelSource(path="models/linked"), root=world.root, digests=digests)

    _link(world.root / "calibration" / "calib.txt", world.outside / "secret.txt")
    with pytest.raises(SymlinkError):
        load_calibration(Calibration(files=["calibration/calib.txt"]), root=world.root)

    _link(world.root / "calibration" / "eval", world.outside)
    evaluation = SimpleNamespace(file="calibration/eval/heldout.txt")
    ctx = SimpleNamespace(root=world.root, recipe=SimpleNamespace(evaluation=evaluation))
    with pytest.raises(SymlinkError, match="calibration/eval"):
        _text(ctx)

    _link(world.task / "items.jsonl", world.outside / "secret.txt")
    with pytest.raises(SymlinkError, match="items.jsonl"):
        resolve_task(TaskSpec(name="evil", path="tasks/evil"), root=world.root)
    assert _leaks(world) == []


def test_link_swapped_in_after_the_check_is_refused_at_use(world, tmp_path):
    """Validation passed; then a file becomes a link. The step that reads it refuses."""
    from quantkit.calibration import load_calibration
    from quantkit.scoring.tasks import _resolved_yaml, resolve_task
    from quantkit.source import fetch_model

    assert main(["validate", str(world.recipe)]) == 0
    snapshot = fetch_model(source=ModelSource(path="models/tiny"), root=world.root,
                           digests=DigestCache(tmp_path / "digests.json"))
    task = resolve_task(TaskSpec(name="evil", path="tasks/evil"), root=world.root)

    _link(world.model / "merges.txt", world.outside / "secret.txt")
    with pytest.raises(SymlinkError, match="merges.txt"):
        snapshot.check_links()  # what convert and GPTQModel call before they read the folder

    _link(world.task / "items.jsonl", world.outside / "secret.txt")
    dest = tmp_path / "include"
    dest.mkdir()
    with pytest.raises((SymlinkError, RecipeError), match="items.jsonl.*symlink"):
        _resolved_yaml(task, dest)
    assert not list(dest.rglob("*.jsonl"))

    _link(world.root / "calibration", world.outside)
    with pytest.raises(SymlinkError, match="calibration"):
        load_calibration(Calibration(files=["calibration/calib.txt"]), root=world.root)
    assert _leaks(world) == []
    assert world.secret not in "".join(p.read_text(errors="replace") for p in dest.rglob("*") if p.is_file())


def test_hub_cache_links_to_its_own_blobs_are_kept(tmp_path):
    """huggingface_hub's snapshot links into its own blobs are the one kind of link allowed; any other is not."""
    from quantkit.source import check_no_links

    repo = tmp_path / "hub" / "models--acme--m"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "abc").write_text("{}")
    (snapshot / "config.json").symlink_to(os.path.relpath(blobs / "abc", snapshot))
    check_no_links(snapshot, blobs=blobs)
    with pytest.raises(SymlinkError):
        check_no_links(snapshot, blobs=None)  # a local folder: no link at all
    (tmp_path / "secret.txt").write_text("x")
    (snapshot / "merges.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(SymlinkError, match="merges.txt"):
        check_no_links(snapshot, blobs=blobs)
