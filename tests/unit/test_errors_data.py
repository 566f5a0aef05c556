"""`tedmoe data prepare` refuses bad input in one line and never loses a user's files."""

import json
from pathlib import Path

import numpy as np
import pytest

from tedmoe.cli import main
from tedmoe.data.dataset import TokenDataset, prepare
from tedmoe.data.tokenizer import ByteTokenizer

LATIN1 = "café naïve — déjà vu\n".encode("latin-1", errors="replace") * 50 + b"\xff\xfe\x00\x80 end\r\n"


def run(capsys, *args):
    """Exit code and stderr lines of ``tedmoe data prepare ARGS`` run in this process."""
    code = main(["data", "prepare", *map(str, args)])
    return code, capsys.readouterr().err.splitlines()


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def user(tmp_path):
    """A user's home: a text corpus, notes, a subdirectory, a binary file."""
    home = tmp_path / "home"
    (home / "corpus" / "sub").mkdir(parents=True)
    (home / "corpus" / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    (home / "corpus" / "sub" / "b.md").write_text("pack my box with five dozen liquor jugs! " * 100)
    (home / "notes.txt").write_text("do not lose me\n")
    (home / "photo.bin").write_bytes(bytes(range(256)) * 8)
    (home / "empty").mkdir()
    (home / "binonly").mkdir()
    (home / "binonly" / "x.bin").write_bytes(b"\x00\x01")
    (home / "tiny.txt").write_text("0123456789")
    (home / "void.txt").write_text("")
    (home / "latin.txt").write_bytes(LATIN1)
    return home


BAD = [  # (args with {h} for the user's home, expected fragment)
    (["{h}/missing.txt", "--out", "{h}/ds"], "input {h}/missing.txt does not exist"),
    (["{h}/binonly", "--out", "{h}/ds"], "no text files found in {h}/binonly"),
    (["{h}/corpus", "--out", "{h}/notes.txt"], "is an existing file; choose a directory path"),
    (["{h}/corpus", "--out", "{h}/notes.txt/ds"], "which is a file; choose a directory path"),
    (["{h}/corpus", "--out", "{h}"], "choose an --out outside the inputs"),
    (["{h}/corpus", "--out", "{h}/corpus"], "choose an --out outside the inputs"),
    (["{h}/corpus", "--out", "{h}/corpus/sub"], "choose an --out outside the inputs"),
    (["{h}/corpus", "--out", "{h}/corpus/ds"], "choose an --out outside the inputs"),
    (["{h}/notes.txt", "--out", "{h}/notes.txt"], "choose an --out outside the inputs"),
    (["{h}/corpus/a.txt", "--out", "{h}/corpus"], "choose an --out outside the inputs"),
    (["{h}/notes.txt", "--out", "{h}/corpus"], "is a non-empty directory that is not a tedmoe dataset"),
    (["{h}/corpus", "--out", "{h}/ds", "--tokenizer", "bpe", "--vocab-size", "10"], "must be > 256"),
    (["{h}/corpus", "--out", "{h}/ds", "--tokenizer", "bpe", "--vocab-size", "256"], "must be > 256"),
    (["{h}/corpus", "--out", "{h}/ds", "--val-fraction", "1.0"], "strictly between 0 and 1"),
    (["{h}/corpus", "--out", "{h}/ds", "--val-fraction", "0"], "strictly between 0 and 1"),
    (["{h}/corpus", "--out", "{h}/ds", "--val-fraction", "-0.5"], "strictly between 0 and 1"),
    (["{h}/corpus", "--out", "{h}/ds", "--val-fraction", "nan"], "strictly between 0 and 1"),
    (["{h}/corpus", "--out", "{h}/ds", "--val-fraction", "inf"], "strictly between 0 and 1"),
    (["{h}/tiny.txt", "--out", "{h}/ds"], "hold 10 tokens in 1 file(s) and --val-fraction 0.05 leaves the val "
     "split empty"),
    (["{h}/void.txt", "--out", "{h}/ds"], "hold 0 tokens in 1 file(s): every input file is empty"),
    (["{h}/latin.txt", "--out", "{h}/ds", "--tokenizer", "bpe"], "{h}/latin.txt is not valid UTF-8 (byte offset 3"),
]


@pytest.mark.parametrize("args,fragment", BAD, ids=[f"{i}-{m[:30]}" for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_one_line_and_touches_nothing(user, capsys, args, fragment):
    h = user.resolve()
    before = snapshot(h)
    code, err = run(capsys, *(a.format(h=h) for a in args))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("tedmoe: error: ") and fragment.format(h=h) in err[0], err[0]
    assert snapshot(h) == before and not (h / "ds").exists()


@pytest.mark.parametrize("flag,value", [("--tokenizer", "sentencepiece"), ("--val-fraction", "a tenth"),
                                        ("--vocab-size", "big")])
def test_malformed_arguments_exit_2(user, capsys, flag, value):
    try:  # argparse's own check: exit 2 naming the argument, however the CLI words it
        code = main(["data", "prepare", str(user / "corpus"), "--out", str(user / "ds"), flag, value])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and flag in capsys.readouterr().err and not (user / "ds").exists()


def test_unknown_tokenizer_from_the_library(user):
    with pytest.raises(ValueError, match="unknown tokenizer 'sp'; use 'byte' or 'bpe'"):
        prepare([str(user / "corpus")], user / "ds", tokenizer="sp")


def test_out_pointing_at_the_users_files_loses_nothing(user, tmp_path, capsys, monkeypatch):
    before = snapshot(tmp_path)
    corpus, sub = user / "corpus", user / "corpus" / "sub"
    for inputs, out in [(corpus, user), (sub, corpus), (corpus, corpus), (sub, user), (corpus, user / "notes.txt"),
                        (corpus, user / "photo.bin"), (user / "notes.txt", corpus)]:
        assert run(capsys, inputs, "--out", out)[0] == 2
    monkeypatch.chdir(user)
    assert run(capsys, "corpus", "--out", ".")[0] == 2  # `.` holds the sources
    monkeypatch.chdir(sub)
    assert run(capsys, user / "notes.txt", "--out", ".")[0] == 2  # `.` holds someone's files
    assert snapshot(tmp_path) == before


def test_an_empty_directory_is_filled(user, capsys):
    assert run(capsys, user / "corpus", "--out", user / "empty")[0] == 0
    assert sorted(p.name for p in (user / "empty").iterdir()) == ["meta.json", "tokenizer.json", "train.bin",
                                                                  "train.rarity.f32", "val.bin"]
    assert TokenDataset(user / "empty", "train").meta["format"] == "tedmoe-tokens"


def test_replacing_an_old_dataset(user, tmp_path):
    out = tmp_path / "ds"
    prepare([str(user / "corpus" / "a.txt")], out)
    meta = json.loads((out / "meta.json").read_text())
    del meta["format"]  # an older dataset, written before the marker existed
    (out / "meta.json").write_text(json.dumps(meta))
    prepare([str(user / "corpus")], out)
    assert TokenDataset(out, "train").meta["files"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "home"]  # no temporary directory left


def test_a_failed_replacement_keeps_the_old_dataset(user, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    prepare([str(user / "corpus" / "a.txt")], out)
    before = snapshot(out)

    def broken_save(self, directory):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ByteTokenizer, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare([str(user / "corpus")], out)
    monkeypatch.undo()

    rename = Path.rename

    def broken_rename(self, target):  # setting the old dataset aside works; moving the new one in fails
        if ".tmp-" in self.name and not self.name.endswith(".old"):
            raise OSError("rename failed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", broken_rename)
    with pytest.raises(OSError, match="rename failed"):
        prepare([str(user / "corpus")], out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "home"]


def test_byte_tokenizer_round_trips_non_utf8_and_bpe_refuses_it(user, tmp_path, capsys):
    out = prepare([str(user / "latin.txt")], tmp_path / "ds", val_fraction=0.1)
    tokens = np.concatenate([np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert bytes(tokens.astype(np.uint8)) == LATIN1 and tokens.max() < 256
    assert TokenDataset(out, "val").meta["val"]["tokens"] == int(len(LATIN1) * 0.1)
    before = snapshot(tmp_path)
    code, err = run(capsys, user / "latin.txt", "--out", tmp_path / "ds", "--tokenizer", "bpe", "--vocab-size", 300)
    assert code == 2 and len(err) == 1 and "latin.txt is not valid UTF-8" in err[0]
    assert "--tokenizer byte" in err[0] and "convert the file to UTF-8" in err[0]
    assert snapshot(tmp_path) == before
