"""Hostile training inputs (issue 14, items 6 and 8): annotation files with bad bytes, types or times,
unreadable videos, tampered resume files and interruptions all end in one line naming the file (and
line), never a traceback, a silent change of schedule or a damaged checkpoint."""

import json
import re
import zipfile

import pytest
import torch
from click.testing import CliRunner

from cmdcl.cli.eval import main as eval_cli
from cmdcl.cli.train import main as train_cli
from cmdcl.data.datasets import load_dataset, read_breakfast, read_charades, read_coin
from cmdcl.data.manifest import ManifestError, read_manifest
from cmdcl.model import load_checkpoint
from cmdcl.train import loop
from cmdcl.train.loop import ResumeError, TrainOptions, evaluate, train
from test_train import SIZE, make_synth

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def one_line_error(result, *parts, code=1):
    """The CLI failed with `code` and one error line (after any progress bars) naming `parts`, without a traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert all(part in last for part in parts), result.output


@pytest.fixture
def videos(tmp_path):
    for name in ("a.mp4", "b.mp4"):
        write(tmp_path / name, "never decoded by the readers")
    return tmp_path


# ---- annotation files ------------------------------------------------------------------------
def test_manifest_with_invalid_utf8_names_the_file_and_line(videos):
    manifest = write(videos / "m.csv", b"path,label\na.mp4,tea\nb.mp4,caf\xe9\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: the manifest is not UTF-8 text \(byte 0xe9\)"):
        read_manifest(manifest)
    result = CliRunner().invoke(train_cli, ["--data", str(manifest), "--out", str(videos / "x.pt")])
    one_line_error(result, f"{manifest}:3: the manifest is not UTF-8")
    write(videos / "classes.txt", b"tea\n\xff\n")
    with pytest.raises(ManifestError, match=r"classes\.txt:2: the class list is not UTF-8"):
        read_manifest(write(videos / "m.csv", "path,label\na.mp4,tea\n"))


def test_utf8_byte_order_mark_and_repeated_labels_are_accepted(videos):
    data = read_manifest(write(videos / "m.csv", "\ufeffpath,label\na.mp4,tea|tea\nb.mp4,coffee\n"))
    assert data.classes == ["coffee", "tea"] and [e.labels for e in data.entries] == [[1], [0]] and not data.multi_label


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,label\na.mp4," + "x" * 200_000 + "\n", r"m\.csv:2: malformed manifest \(field larger than field limit"),
        ("path,label\n" + "d/" * 3000 + "a.mp4,tea\n", r"m\.csv:2: not a file path \(a NUL byte, or over 4096 characters\)"),
        ("path,label\n" + "x" * 300 + ".mp4,tea\n", r"m\.csv:2: cannot use the path 'xxx.*\.\.\.' \(File name too long\)"),
        ("path,label\na\0.mp4,tea\n", r"m\.csv:2: not a file path"),
        ("path,label\na.mp4," + "t" * 300 + "\n", r"m\.csv:2: label 'ttt.*\.\.\.' is longer than 256 characters"),
        ("path,label,segments\na.mp4,tea,0:1:ok\nb.mp4,tea,nan:2:pour\n", r"m\.csv:3: bad segment 'nan:2:pour': its times must be finite"),
        ("path,label,segments\na.mp4,tea,0:inf:pour\n", r"m\.csv:2: bad segment '0:inf:pour': its times must be finite"),
        ("path,label,segments\na.mp4,tea,-1:2:pour\n", r"m\.csv:2: bad segment '-1:2:pour': it starts before 0 s"),
        ("path,label,segments\na.mp4,tea,3:2:pour\n", r"m\.csv:2: bad segment '3:2:pour': it ends before it starts"),
        ("path,label\na.mp4,tea\n./a.mp4,coffee\n", r"m\.csv:3: .*a\.mp4 is already listed on line 2"),
        ("", r"m\.csv: the manifest is empty"),
        ('path,label\n"a.mp4,tea\n', r"m\.csv:2: expected at least a path and a label"),
    ],
    ids=["long-field", "long-path", "long-file-name", "nul", "long-label", "nan", "inf", "negative", "reversed", "duplicate",
         "empty", "open-quote"],
)
def test_bad_manifest_fields_name_the_line(videos, text, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(write(videos / "m.csv", text))


def test_manifest_that_is_a_folder_or_unknown_label_is_one_line(videos):
    result = CliRunner().invoke(train_cli, ["--data", str(videos / "nowhere.csv"), "--out", str(videos / "x.pt")])
    one_line_error(result, "nowhere.csv: no such manifest or dataset folder")
    manifest = write(videos / "m.csv", "path,label\na.mp4,tea\nb.mp4,juice\n")
    result = CliRunner().invoke(train_cli, ["--data", str(manifest), "--out", str(videos / "x.pt"), "--classes",
                                            str(write(videos / "list.txt", "tea\ncoffee\n"))])
    one_line_error(result, f"{manifest}:3: unknown label 'juice'")


def coin(root, database):
    write(root / "videos" / "12" / "vid1.mp4", "x")
    write(root / "COIN.json", database if isinstance(database, (str, bytes)) else json.dumps({"database": database}))
    return root


GOOD_COIN = {"recipe_type": 12, "class": "MakeTea", "subset": "training", "annotation": [{"segment": [1.0, 4.5], "label": "boil"}]}


@pytest.mark.parametrize(
    "database, message",
    [
        (b'{"database": {"vid1": {"class": "Caf\xe9"}}}', r"COIN\.json:1: the COIN annotation JSON is not UTF-8"),
        ('{"database": {\n"vid1": [}', r"COIN\.json:2: not valid JSON"),
        ("[" * 100_000, r"COIN\.json: not COIN's annotation JSON \(nested too deeply\)"),
        ('{"database": [1, 2]}', r"no 'database' object of videos"),
        ({"vid1": {**GOOD_COIN, "recipe_type": "12"}}, r"video 'vid1': expected 'recipe_type' \(an integer\), 'class'"),
        ({"vid1": {"recipe_type": 12, "subset": "training"}}, r"video 'vid1': expected 'recipe_type'"),
        ({"vid1": "MakeTea"}, r"video 'vid1': expected 'recipe_type'"),
        ({"vid1": {**GOOD_COIN, "annotation": [{"segment": [1.0], "label": "boil"}]}}, r"video 'vid1': bad annotation"),
        ({"vid1": {**GOOD_COIN, "annotation": [{"segment": ["1", 2], "label": "boil"}]}}, r"video 'vid1': bad annotation"),
        ({"vid1": {**GOOD_COIN, "annotation": [{"segment": [float("nan"), 2], "label": "boil"}]}}, r"bad segment 'nan:2:boil'"),
        ({"vid1": {**GOOD_COIN, "annotation": [{"segment": [5, 2], "label": "boil"}]}}, r"bad segment '5:2:boil': it ends before"),
        ({"vid1": {**GOOD_COIN, "annotation": [{"segment": [0, 10**400], "label": "boil"}]}},
         r"bad segment '0:inf:boil': its times must be finite"),
        ('{"database": {"vid1": {"recipe_type": 1' + "0" * 5000 + "}}}", r"COIN\.json: not valid JSON \(Exceeds the limit"),
        ({"vid1": GOOD_COIN, "vid2": {**GOOD_COIN, "class": "FryEgg"}}, r"video 'vid2': recipe_type 12 is 'FryEgg' here but 'MakeTea'"),
        ({"../../vid1": GOOD_COIN}, r"video id '\.\./\.\./vid1' is not a plain file name"),
    ],
    ids=["utf8", "json", "deep", "not-object", "recipe-str", "no-class", "item-str", "short-span", "str-time", "nan", "reversed",
         "huge-time", "huge-int", "two-names", "path-id"],
)
def test_coin_annotation_errors_name_the_file_and_video(tmp_path, database, message):
    with pytest.raises(ManifestError, match=message):
        read_coin(coin(tmp_path, database))


def charades(root, table, classes="c000 Holding a cup\nc001 Drinking from a cup\n"):
    write(root / "Charades_v1_classes.txt", classes)
    write(root / "Charades_v1_480" / "AB12C.mp4", "x")
    return write(root / "Charades_v1_train.csv", table)


@pytest.mark.parametrize(
    "table, classes, message",
    [
        (b"id,actions\nAB12C,c000 0 1\nAB12C,c000 0 \xff\n", None, r"Charades_v1_train\.csv:3: the Charades annotation table is not UTF-8"),
        ("id,actions\nAB12C,c000 0 " + "1" * 200_000 + "\n", None, r"Charades_v1_train\.csv:2: malformed Charades annotation table"),
        ("subject,actions\ns1,c000 0 1\n", None, r"Charades_v1_train\.csv:1: the header must name the columns 'id' and 'actions'"),
        ("id,actions\nAB12C,c000 nan 1\n", None, r"Charades_v1_train\.csv:2: bad segment 'nan:1:Holding a cup'"),
        ("id,actions\nAB12C,c001 4 2\n", None, r"Charades_v1_train\.csv:2: bad segment '4:2:Drinking from a cup': it ends before"),
        ("id,actions\nAB12C,c000 0 1\nAB12C,c001 0 1\n", None, r"Charades_v1_train\.csv:3: video AB12C is already listed on line 2"),
        ("id,actions\n../AB12C,c000 0 1\n", None, r"Charades_v1_train\.csv:2: video id '\.\./AB12C' is not a plain file name"),
        ("id,actions\nAB12C,c000 0 1\n", b"c000 Holding a cup\nc001 Caf\xe9\n",
         r"Charades_v1_classes\.txt:2: the Charades class list is not UTF-8"),
        ("id,actions\nAB12C,c000 0 1\n", "c000 Holding a cup\nc000 Drinking\n",
         r"Charades_v1_classes\.txt:2: class c000 'Drinking' is listed twice"),
    ],
    ids=["utf8", "long-field", "no-id", "nan", "reversed", "duplicate", "path-id", "classes-utf8", "classes-duplicate"],
)
def test_charades_annotation_errors_name_the_file_and_line(tmp_path, table, classes, message):
    charades(tmp_path, table, *([classes] if classes else []))
    with pytest.raises(ManifestError, match=message):
        read_charades(tmp_path)


def test_charades_rows_record_where_each_video_is_listed(tmp_path):
    table = charades(tmp_path, "id,actions\nXY34Z,\nAB12C,c001 0 1;c000 0.5 2;\n")
    data = read_charades(tmp_path)
    assert [e.listed_at for e in data.entries] == [f"{table}:3"] and data.entries[0].labels == [0, 1]


@pytest.mark.parametrize(
    "labels, message",
    [(b"1-30 SIL\n31-40 caf\xe9\n", r"P20_tea\.avi\.labels:2: the Breakfast labels file is not UTF-8"),
     ("0-30 SIL\n", r"P20_tea\.avi\.labels:1: bad segment '-0\.0666667:2:SIL': it starts before 0 s"),
     ("40-30 SIL\n", r"P20_tea\.avi\.labels:1: bad segment .*: it ends before it starts"),
     ("1-" + "9" * 5000 + " SIL\n", r"P20_tea\.avi\.labels:1: expected 'first-last action'")],
    ids=["utf8", "zero-frame", "reversed", "huge-number"],
)
def test_breakfast_labels_errors_name_the_file_and_line(tmp_path, labels, message):
    write(tmp_path / "P20" / "cam01" / "P20_tea.avi", "x")
    write(tmp_path / "P20" / "cam01" / "P20_tea.avi.labels", labels)
    with pytest.raises(ManifestError, match=message):
        read_breakfast(tmp_path)


# ---- training and evaluation on real (tiny) videos ----------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory, 8, 4)


def options(synth, out, **overrides):
    base = dict(data=str(synth["train"]), out=str(out), epochs=2, batch_size=4, frames=2, image_size=SIZE, text_init="random",
                cache_dir=str(synth["train"].parent.parent / "cache"))
    return TrainOptions(**{**base, **overrides})


def with_bad_video(manifest, tmp_path, name="broken.mp4", data=b"this is not a video"):
    """A copy of `manifest` (absolute paths) with one more line, 'broken.mp4', that is not a video."""
    broken = write(tmp_path / name, data)
    rows = read_manifest(manifest)
    lines = ["path,label"] + [f"{e.path},{rows.classes[e.labels[0]]}" for e in rows.entries] + [f"{broken},{rows.classes[0]}"]
    copy = write(tmp_path / "with_bad.csv", "\n".join(lines) + "\n")
    return copy, broken, len(lines)


def test_an_unreadable_training_video_is_named_with_its_manifest_line(synth, tmp_path):
    manifest, broken, line = with_bad_video(synth["train"], tmp_path)
    args = ["--data", str(manifest), "--out", str(tmp_path / "x.pt"), "--epochs", "1", "--batch-size", "4", "--frames", "2",
            "--image-size", str(SIZE), "--text-init", "random"]
    result = CliRunner().invoke(train_cli, args)
    one_line_error(result, f"{manifest}:{line}: {broken}: not a video")
    assert not (tmp_path / "x.pt").exists()


def test_an_unexpected_error_while_reading_a_video_names_it(synth, tmp_path, monkeypatch):
    """The reproduced case: a malformed Matroska DURATION tag raised a bare ValueError without the file name."""
    from cmdcl.data import video

    def bad_duration_tag(path, *args, **kwargs):
        raise ValueError("could not convert string to float: '00-00-01.6'")

    monkeypatch.setattr(video, "read_clip", bad_duration_tag)
    result = CliRunner().invoke(train_cli, ["--data", str(synth["train"]), "--out", str(tmp_path / "x.pt"), "--epochs", "1",
                                            "--batch-size", "4", "--frames", "2", "--image-size", str(SIZE), "--text-init", "random"])
    first = read_manifest(synth["train"]).entries[0].path
    one_line_error(result, f"{synth['train']}:2: {first}: unexpected ValueError: could not convert string to float: '00-00-01.6'")
    # --candidates 0 reads videos during the epochs: the same message
    with pytest.raises(ManifestError, match=r"manifest\.csv:\d+: .*\.mp4: unexpected ValueError: could not convert"):
        loop.random_offset_clips(load_dataset(synth["train"]), torch.tensor([3]), 0, 0, 2, SIZE)


def test_a_damaged_clip_cache_is_rebuilt_with_a_warning(synth, tmp_path, capsys):
    data = load_dataset(synth["test"])
    clips = loop.decode_clips(data, 2, SIZE, str(tmp_path))
    (cache,) = tmp_path.glob("clips-*.pt")
    for damage in (lambda: cache.write_bytes(b"half a file"), lambda: torch.save(torch.zeros(3, dtype=torch.uint8), cache)):
        damage()
        assert torch.equal(loop.decode_clips(data, 2, SIZE, str(tmp_path)), clips)
        assert f"warning: {cache}: unreadable or not the expected data; rebuilding it" in capsys.readouterr().err
    assert torch.equal(loop.decode_clips(data, 2, SIZE, str(tmp_path)), clips) and not capsys.readouterr().err  # rebuilt


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    """A model trained one epoch of two (so a resume file exists)."""
    out = tmp_path_factory.mktemp("model") / "model.pt"
    model = train(options(synth, out), progress=False, stop_after=1)
    return model, out


def test_evaluation_skips_an_unreadable_video_with_a_warning_and_counts_it(synth, trained, tmp_path):
    model, out = trained
    manifest, broken, line = with_bad_video(synth["test"], tmp_path)
    report = evaluate(model, load_dataset(manifest, classes=model.class_names))
    assert (report["videos"] == 4 and len(report["skipped"]) == 1
            and report["skipped"][0].startswith(f"{manifest}:{line}: {broken}: not a video"))
    result = CliRunner().invoke(eval_cli, ["--ckpt", str(out), "--data", str(manifest), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output + result.stderr
    assert f"warning: skipped {manifest}:{line}: {broken}: not a video" in result.stderr
    assert "warning: 1 of 5 videos could not be read" in result.stderr and "videos 4" in result.stdout
    assert json.loads((tmp_path / "m.json").read_text())["skipped"] == report["skipped"]
    only_bad = write(tmp_path / "only_bad.csv", f"path,label\n{broken},{model.class_names[0]}\n")
    result = CliRunner().invoke(eval_cli, ["--ckpt", str(out), "--data", str(only_bad)])
    assert result.exit_code == 1 and f"{only_bad}: none of its 1 videos could be read" in result.output.splitlines()[-1]


def test_outputs_never_replace_a_listed_video(synth, trained, tmp_path):
    """--out (cmdcl-train) and --json (cmdcl-eval) are compared with every video the data lists, not only the manifest."""
    model, out = trained
    video = read_manifest(synth["test"]).entries[1].path
    before = video.read_bytes()
    with pytest.raises(ValueError, match=rf"--out {re.escape(str(video))} is a --val video"):
        train(options(synth, video, val=str(synth["test"])), progress=False)
    result = CliRunner().invoke(eval_cli, ["--ckpt", str(out), "--data", str(synth["test"]), "--json", str(video)])
    one_line_error(result, f"--json {video} is a video of --data")
    result = CliRunner().invoke(eval_cli, ["--ckpt", str(out), "--data", str(synth["test"]), "--json", str(out)])
    one_line_error(result, f"--json {out} is --ckpt")
    assert video.read_bytes() == before and load_checkpoint(out).class_names == model.class_names


def test_a_bad_val_manifest_is_reported_before_training(synth, tmp_path):
    val = write(tmp_path / "val.csv", f"path,label\n{read_manifest(synth['test']).entries[0].path},bake bread\n")
    with pytest.raises(ManifestError, match=r"val\.csv:2: unknown label 'bake bread'"):
        train(options(synth, tmp_path / "m.pt", val=str(val)), progress=False)
    assert not (tmp_path / "m.pt").exists()  # no epoch was trained


# ---- resume files --------------------------------------------------------------------------------
def tampered(trained, tmp_path, change):
    """A copy of the trained model's resume file with `change(state)` applied, at tmp_path/model.pt.resume."""
    _, out = trained
    state = torch.load(f"{out}.resume", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "model.pt.resume")
    return tmp_path / "model.pt"


def scale_lr(state):
    state["optimizer"]["param_groups"][0]["lr"] *= 10


def set_step(state):
    next(iter(state["optimizer"]["state"].values()))["step"] = torch.tensor(1e9)


def another_model(state):
    state["model"]["token_proj.weight"] = torch.zeros(3, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("scheduler"),
         r"not a complete cmdcl-train resume file \(it holds epoch, format, history, model, optimizer, options, text_init\)"),
        (lambda s: s.update(epoch=10**9), r"cannot resume: epoch 1000000000 is not one of this run's epochs 1-2"),
        (lambda s: s.update(epoch=-5), r"cannot resume: epoch -5 is not one of this run's epochs 1-2"),
        (lambda s: s.update(epoch="1"), r"cannot resume: epoch '1' is not one of"),
        (lambda s: s.update(epoch=2), r"cannot resume: its history is not one loss and accuracy for each of its 2 epochs"),
        (lambda s: s.update(history=[{"epoch": 1, "loss": "low", "accuracy": 0.5}]),
         r"cannot resume: its history is not one loss and accuracy"),
        (lambda s: s.update(options=5), r"cannot resume: it was trained with data=None"),
        (lambda s: s.update(text_init=["clip"]), r"cannot resume: unknown text init \['clip'\]"),
        (lambda s: s["scheduler"].update(last_epoch=7),
         r"cannot resume: its learning-rate schedule is not at step 2 \(1 epochs of 2 batches"),
        (lambda s: s["scheduler"].update(base_lrs=[1.0] * 4), r"cannot resume: its learning-rate schedule is not at step 2"),
        (scale_lr, r"cannot resume: its optimizer settings \(parameter groups, learning rates, weight decay\) differ"),
        (set_step, r"cannot resume: its optimizer state does not fit this model at step 2 \(step 1e\+09"),
        (another_model,
         r"cannot resume: its model state does not fit this model \(token_proj\.weight is not a torch\.float32 tensor of shape"),
        (lambda s: s["model"].popitem(), r"cannot resume: its model state does not fit this model \(different names\)"),
        (lambda s: s["model"]["token_proj.weight"].fill_(float("nan")),
         r"cannot resume: its model state does not fit this model \(token_proj\.weight holds NaN or infinite values\)"),
    ],
    ids=["missing-field", "huge-epoch", "negative-epoch", "str-epoch", "epoch-beyond-history", "history-types", "options-type",
         "text-init", "scheduler-step", "scheduler-lr", "optimizer-lr", "optimizer-step", "another-model", "missing-tensor", "nan"],
)
def test_tampered_resume_file_is_refused_naming_it(synth, trained, tmp_path, change, message):
    out = tampered(trained, tmp_path, change)
    with pytest.raises(ResumeError, match=rf"^{re.escape(str(tmp_path))}/model\.pt\.resume: {message}"):
        train(options(synth, out, resume=True), progress=False)
    assert not out.exists()  # nothing trained, nothing written


def test_unreadable_resume_file_is_one_line(synth, trained, tmp_path):
    _, out = trained
    resume = tmp_path / "model.pt.resume"
    args = ["--data", str(synth["train"]), "--out", str(tmp_path / "model.pt"), "--epochs", "2", "--batch-size", "4", "--frames", "2",
            "--image-size", str(SIZE), "--text-init", "random", "--cache-dir", options(synth, out).cache_dir, "--resume"]
    write(resume, b"PK\x03\x04 not really a zip")
    one_line_error(CliRunner().invoke(train_cli, args),
                   f"{resume}: not a readable cmdcl-train resume file (not a readable torch checkpoint (not a zip archive")
    resume.unlink()
    resume.mkdir()
    with pytest.raises(ValueError, match=f"^--out's resume state {re.escape(str(resume))}: is a directory, not a file"):
        train(options(synth, tmp_path / "model.pt", resume=True), progress=False)
    resume.rmdir()
    torch.save({"format": "cmdcl-resume", "epoch": zipfile.ZipInfo("x")}, resume)  # an object: refused by weights_only
    one_line_error(CliRunner().invoke(train_cli, args), f"{resume}: not a readable cmdcl-train resume file")
    # entries re-compressed, as in a zip bomb: refused before anything is unpacked
    with zipfile.ZipFile(f"{out}.resume") as src, zipfile.ZipFile(resume, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    one_line_error(CliRunner().invoke(train_cli, args), f"{resume}: not a readable cmdcl-train resume file (refused: archive entry",
                   "is compressed")
    resume.write_bytes(open(f"{out}.resume", "rb").read())  # the genuine file still resumes
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0 and "epoch 2:" in result.output, result.output
    assert len(load_checkpoint(tmp_path / "model.pt").checkpoint_extra["history"]) == 2


# ---- interruptions ---------------------------------------------------------------------------------
def test_an_interrupted_save_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "model.pt.resume"
    loop._atomic_save({"epoch": 1}, target)
    before = target.read_bytes()

    def interrupted(obj, path):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop._atomic_save({"epoch": 2}, target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt.resume"]


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    result = CliRunner().invoke(train_cli, ["--data", "m.csv", "--out", str(tmp_path / "x.pt")])
    one_line_error(result, f"cmdcl-train: interrupted; {tmp_path / 'x.pt'} and its .resume file keep the last completed epoch", code=130)
    monkeypatch.setattr("cmdcl.model.load_checkpoint", interrupted)
    one_line_error(CliRunner().invoke(eval_cli, ["--ckpt", "m.pt", "--data", "m.csv"]), "cmdcl-eval: interrupted", code=130)


@pytest.mark.parametrize("content, message", [
    (b"\x80\x02garbage that is no pickle" * 50, "not a readable weights file"),
    (b"hello\n", "not a readable weights file"),
    ({"a": torch.zeros(2)}, "not CLIP weights (no 'visual.conv1.weight' tensor)"),
    ({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "visual.positional_embedding": torch.zeros(5, 8)},
     "not CLIP weights (no 'visual.proj' tensor)"),
])
def test_a_file_that_is_not_clip_weights_is_one_line_naming_it(synth, tmp_path, content, message):
    weights = tmp_path / "clip.pt"
    if isinstance(content, bytes):
        weights.write_bytes(content)
    else:
        torch.save(content, weights)
    args = ["--data", str(synth["train"]), "--out", str(tmp_path / "x.pt"), "--epochs", "1", "--clip-weights", str(weights)]
    result = CliRunner().invoke(train_cli, args)
    one_line_error(result, f"{weights}: {message}")
    assert "unexpected" not in result.output and not (tmp_path / "x.pt").exists()
