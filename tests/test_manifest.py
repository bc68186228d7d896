"""Manifests and the Breakfast / COIN / Charades readers: formats and clear errors."""

import json

import pytest

from cmdcl.data.datasets import load_dataset, read_breakfast, read_charades, read_coin
from cmdcl.data.manifest import ManifestError, read_manifest, write_manifest


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def videos(tmp_path):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (tmp_path / name).write_bytes(b"not decoded by the manifest reader")
    return tmp_path


def test_reads_labels_segments_and_class_file(videos):
    write(videos / "classes.txt", "make tea\nfry egg\nmake salad\n")
    manifest = write(videos / "m.csv", "path,label,segments\na.mp4,fry egg,0:1.5:crack egg|1.5:3:fry\nb.mp4,make tea,\n")
    data = read_manifest(manifest)
    assert data.classes == ["make tea", "fry egg", "make salad"]  # order from classes.txt, unused class kept
    assert [e.labels for e in data.entries] == [[1], [0]]
    assert data.entries[0].path == videos / "a.mp4"
    assert [(s.start, s.end, s.name) for s in data.entries[0].segments] == [(0.0, 1.5, "crack egg"), (1.5, 3.0, "fry")]
    assert not data.multi_label and data.targets().tolist() == [1, 0]


def test_segments_target_and_multi_label(videos):
    manifest = write(videos / "m.csv", "path,label,segments\na.mp4,x|y,0:1:cut|1:2:stir|2:3:cut\nb.mp4,y,0:2:stir\n")
    data = read_manifest(manifest)
    assert data.multi_label and data.classes == ["x", "y"] and data.targets().tolist() == [[1, 1], [0, 1]]
    actions = read_manifest(manifest, target="segments")
    assert actions.classes == ["cut", "stir"] and actions.targets().tolist() == [[1, 1], [0, 1]]


def test_missing_video_names_the_line(videos):
    manifest = write(videos / "m.csv", "path,label\na.mp4,tea\nmissing.mp4,tea\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: video file not found: .*missing\.mp4"):
        read_manifest(manifest)


def test_unknown_label_names_the_line(videos):
    manifest = write(videos / "m.csv", "path,label\na.mp4,tea\nb.mp4,coffee\nc.mp4,juice\n")
    with pytest.raises(ManifestError, match=r"m\.csv:4: unknown label 'juice'"):
        read_manifest(manifest, classes=["tea", "coffee"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("video,class\na.mp4,tea\n", r":1: the header must start with 'path,label'"),
        ("path,label,segments\na.mp4,tea,0:x:cut\n", r":2: bad segment '0:x:cut'"),
        ("path,label\na.mp4,\n", r":2: no label given"),
        ("path,label\n", r"lists no videos"),
    ],
)
def test_malformed_manifests(videos, text, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(write(videos / "m.csv", text))


def test_write_manifest_round_trips(videos):
    data = read_manifest(write(videos / "m.csv", "path,label,segments\na.mp4,tea,0.00:1.00:boil\nb.mp4,coffee|tea,\n"))
    again = read_manifest(write_manifest(data, videos / "copy.csv"))
    assert again.classes == data.classes and [e.labels for e in again.entries] == [e.labels for e in data.entries]
    assert again.entries[0].segments == data.entries[0].segments
    assert "a.mp4" in (videos / "copy.csv").read_text().splitlines()[1].split(",")[0]  # relative path


def test_breakfast_layout(tmp_path):
    root = tmp_path / "BreakfastII_15fps_qvga_sync"
    for person, activity in (("P03", "cereals"), ("P20", "tea"), ("P21", "scrambledegg")):
        write(root / person / "cam01" / f"{person}_{activity}.avi", "x")
    write(root / "P20" / "cam01" / "P20_tea.avi.labels", "1-30 SIL\n31-150 take_cup\n")
    train, test = read_breakfast(tmp_path, "train"), read_breakfast(tmp_path, "test")
    assert sorted(train.classes[e.labels[0]] for e in train.entries) == ["scrambledegg", "tea"]
    assert [test.classes[e.labels[0]] for e in test.entries] == ["cereals"]
    tea = next(e for e in train.entries if e.path.name == "P20_tea.avi")
    assert [(s.name, s.start, s.end) for s in tea.segments] == [("SIL", 0.0, 2.0), ("take_cup", 2.0, 10.0)]
    assert load_dataset(tmp_path, "train").classes == train.classes


def test_coin_layout(tmp_path):
    database = {
        "vid1": {"recipe_type": 12, "class": "MakeTea", "subset": "training",
                 "annotation": [{"segment": [1.0, 4.5], "label": "boil water"}]},
        "vid2": {"recipe_type": 3, "class": "ChangeTyre", "subset": "testing", "annotation": []},
        "vid3": {"recipe_type": 12, "class": "MakeTea", "subset": "training", "annotation": []},  # not downloaded
    }
    write(tmp_path / "COIN.json", json.dumps({"database": database}))
    write(tmp_path / "videos" / "12" / "vid1.mp4", "x")
    write(tmp_path / "videos" / "3" / "vid2.mp4", "x")
    train = load_dataset(tmp_path, "train")
    assert train.classes == ["ChangeTyre", "MakeTea"] and len(train.entries) == 1
    assert train.entries[0].labels == [1] and train.entries[0].segments[0].name == "boil water"
    assert read_coin(tmp_path, "test").entries[0].labels == [0]


def test_charades_layout(tmp_path):
    write(tmp_path / "Charades_v1_classes.txt", "c000 Holding some clothes\nc001 Putting clothes somewhere\nc002 Drinking from a cup\n")
    write(
        tmp_path / "Charades_v1_train.csv",
        "id,subject,scene,actions,length\nAB12C,s1,Kitchen,c002 0.00 5.10;c000 2.0 8.5,30.0\nXY34Z,s2,Bedroom,,20.0\n",
    )
    write(tmp_path / "Charades_v1_480" / "AB12C.mp4", "x")
    write(tmp_path / "Charades_v1_480" / "XY34Z.mp4", "x")
    data = read_charades(tmp_path, "train")
    assert data.multi_label and len(data.classes) == 3 and len(data.entries) == 1  # no actions: skipped
    assert data.targets().tolist() == [[1.0, 0.0, 1.0]]
    write(tmp_path / "Charades_v1_train.csv", "id,actions\nAB12C,c999 0 1\n")
    with pytest.raises(ManifestError, match=r"Charades_v1_train\.csv:2: bad action"):
        read_charades(tmp_path, "train")


def test_unknown_folder(tmp_path):
    with pytest.raises(ManifestError, match="not a manifest, nor a Breakfast, COIN or Charades folder"):
        load_dataset(tmp_path)
