"""`tedmoe data prepare --tokenizer DIR`: a Hugging Face directory's tokenizer.json, its ids as they are."""

import json
from pathlib import Path

import pytest

from tedmoe.cli import main
from tedmoe.data.dataset import TokenDataset, is_dataset, prepare

TEXTS = {"a.txt": "def f(x):\n    return x  # héllo, wörld ✓\n" * 30,
         "sub/b.md": "The quick brown fox jumps over the lazy dog. 日本語 🎉\n" * 30}


def train_bpe():
    """A tiny byte-level BPE with ``<s>`` and ``</s>`` as special tokens, trained on ``TEXTS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS.values(), trainer)
    return tok


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    for name, text in TEXTS.items():
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tokenizer directory as transformers saves it."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("model")
    transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe(), bos_token="<s>",
                                         eos_token="</s>").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A tokenizer directory written without transformers; the EOS token in the older dict form."""
    d = tmp_path_factory.mktemp("plain")
    train_bpe().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {
        "__type": "AddedToken", "content": "</s>", "special": True}, "chat_template": "{{ messages }}"}))
    return d


def test_each_file_is_a_document_in_the_directorys_ids(model_dir, texts, tmp_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(model_dir)
    out = prepare([str(texts)], tmp_path / "ds", tokenizer=str(model_dir), val_fraction=0.1)
    train, val = TokenDataset(out, "train"), TokenDataset(out, "val")
    expect_train, expect_val = [], []
    for name in ("a.txt", "sub/b.md"):  # the order prepare reads them in
        ids = [ref.bos_token_id, *ref(TEXTS[name], add_special_tokens=False).input_ids, ref.eos_token_id]
        cut = len(ids) - int(len(ids) * 0.1)
        expect_train += ids[:cut]
        expect_val += ids[cut:]
    assert train.tokens.tolist() == expect_train and val.tokens.tolist() == expect_val
    assert train.meta["tokenizer"] == "hf" and train.meta["tokenizer_source"] == str(model_dir.resolve())
    assert train.vocab_size == len(ref) and train.meta["dtype"] == "uint16"
    tok = train.tokenizer
    assert tok.kind == "hf" and tok.vocab_size == len(ref)
    text = TEXTS["sub/b.md"]
    assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids and tok.decode(tok.encode(text)) == text
    first = expect_train[:len(expect_train) - len(expect_val)]  # a.txt's train share, from <s> on
    assert tok.decode(first).startswith("<s>def f(x):")
    assert (out / "tokenizer_config.json").read_bytes() == (model_dir / "tokenizer_config.json").read_bytes()
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == ref(text).input_ids  # the dataset holds it whole


def test_bos_and_eos_in_dict_form_and_the_cli(plain_dir, texts, tmp_path, capsys):
    out = tmp_path / "ds"
    code = main(["data", "prepare", str(texts / "a.txt"), "--out", str(out), "--tokenizer", str(plain_dir)])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    ds, val = TokenDataset(out, "train"), TokenDataset(out, "val")
    tok = ds.tokenizer
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # the special tokens come first in the vocabulary
    assert ds.tokens[0] == tok.bos_id and val.tokens[-1] == tok.eos_id
    assert tok.decode([*ds.tokens, *val.tokens]) == "<s>" + TEXTS["a.txt"] + "</s>"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"


def test_a_vocabulary_above_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "big"
    src.mkdir()
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(src / "tokenizer.json"))  # no tokenizer_config.json: no BOS / EOS
    (tmp_path / "t.txt").write_text("w69999 w3 w65536 w65535 " * 10)
    out = prepare([str(tmp_path / "t.txt")], tmp_path / "ds", tokenizer=str(src), val_fraction=0.25)
    train, val = TokenDataset(out, "train"), TokenDataset(out, "val")
    assert train.meta["dtype"] == "uint32" and train.vocab_size == 70000
    assert [*train.tokens, *val.tokens] == [69999, 3, 65536, 65535] * 10
    assert train.tokenizer.kind == "hf" and train.tokenizer.decode([69999, 65536]) == "w69999 w65536"


def test_replacing_an_hf_dataset(plain_dir, texts, tmp_path):
    out = tmp_path / "ds"
    prepare([str(texts / "a.txt")], out, tokenizer=str(plain_dir))
    assert is_dataset(out)
    prepare([str(texts)], out, tokenizer=str(plain_dir))  # hf over hf
    assert TokenDataset(out, "train").meta["files"] == 2
    prepare([str(texts)], out, tokenizer="bpe", bpe_vocab_size=300)  # bpe over hf: the config file goes
    assert not (out / "tokenizer_config.json").exists() and TokenDataset(out, "train").tokenizer.kind == "bpe"
    prepare([str(texts)], out, tokenizer=str(plain_dir))  # and hf over bpe
    assert TokenDataset(out, "train").tokenizer.kind == "hf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary directory left


def broken(root: Path, kind: str) -> Path:
    d = root / kind
    d.mkdir()
    if kind == "spm":
        (d / "tokenizer.model").write_bytes(b"\x0a\x0b sentencepiece")
    elif kind == "unparsable":
        (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    elif kind == "badconfig":
        train_bpe().save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text("{bos_token: <s>")
    return d


BAD = [  # (the --tokenizer argument under {h}, what to make there, expected fragments)
    ("nope", None, ["unknown tokenizer '{h}/nope'; use 'byte' or 'bpe', or a directory with tokenizer.json",
                    "--tokenizer {h}/nope does not exist"]),
    ("texts/a.txt", None, ["use 'byte' or 'bpe', or a directory with tokenizer.json",
                           "--tokenizer {h}/texts/a.txt is a file, not a directory"]),
    ("spm", "spm", ["--tokenizer {h}/spm has no tokenizer.json: only the fast tokenizer.json format is read",
                    "sentencepiece tokenizer.model", "AutoTokenizer.from_pretrained(DIR).save_pretrained(NEW_DIR)"]),
    ("unparsable", "unparsable", ["{h}/unparsable/tokenizer.json cannot be read by the tokenizers library: {lib}"]),
    ("badconfig", "badconfig", ["{h}/badconfig/tokenizer_config.json is not valid JSON"]),
]


@pytest.mark.parametrize("arg,make,fragments", BAD, ids=[b[0] for b in BAD])
def test_a_bad_tokenizer_directory_is_one_line_and_writes_nothing(tmp_path, capsys, arg, make, fragments):
    h = tmp_path.resolve()
    (h / "texts").mkdir()
    (h / "texts" / "a.txt").write_text(TEXTS["a.txt"])
    if make:
        broken(h, make)
    lib = ""
    if make == "unparsable":  # the library's own words, whatever its version says
        from tokenizers import Tokenizer

        with pytest.raises(Exception) as refused:
            Tokenizer.from_file(str(h / arg / "tokenizer.json"))
        lib = str(refused.value)
    before = snapshot(h)
    code = main(["data", "prepare", str(h / "texts"), "--out", str(h / "ds"), "--tokenizer", str(h / arg)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tedmoe: error: "), err
    assert all(f.format(h=h, lib=lib) in err[0] for f in fragments), err[0]
    assert snapshot(h) == before and not (h / "ds").exists()


def test_non_utf8_input_names_the_file(plain_dir, tmp_path):
    (tmp_path / "latin.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt is not valid UTF-8 \(byte offset 3"):
        prepare([str(tmp_path / "latin.txt")], tmp_path / "ds", tokenizer=str(plain_dir))
    assert not (tmp_path / "ds").exists()


def test_fine_tune_a_model_on_its_own_tokenizer_and_export_it(model_dir, texts, tmp_path, capsys):
    """data prepare --tokenizer DIR, train --init-from DIR on it, export: transformers reads the
    fine-tuned model with the same tokenizer (ids, BOS/EOS) as the base directory."""
    transformers = pytest.importorskip("transformers")
    import shutil

    import torch

    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    vocab = len(transformers.AutoTokenizer.from_pretrained(base))
    config = transformers.MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                        num_experts_per_tok=1, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(base)
    assert main(["data", "prepare", str(texts), "--out", str(tmp_path / "ds"), "--tokenizer", str(base)]) == 0
    assert main(["train", "--preset", "tiny", "--init-from", str(base), "--out", str(tmp_path / "run"),
                 "--set", f'data.path="{tmp_path / "ds"}"', "--set", "train.max_steps=2",
                 "--set", "train.warmup_steps=0", "--set", "seq_len=32"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(base)
    text = TEXTS["a.txt"][:60]
    assert theirs(text).input_ids == ref(text).input_ids
    assert (theirs.bos_token, theirs.eos_token) == ("<s>", "</s>")
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert tuned.config.vocab_size == vocab
    assert main(["generate", "--ckpt", str(tmp_path / "hf"), "--prompt", "def", "--greedy",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def")  # the BOS the prompt gets is not printed
