"""What tests/unit/test_mixtral.py and tests/unit/test_qwen3_moe.py share: tiny random models built
and written by ``transformers`` itself (nothing downloaded; the family is the ``*ForCausalLM``
class and its config), read and written by tedmoe and held to transformers' logits."""

import json

import torch
from safetensors.torch import load_file

from tedmoe.interop import hf
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology

TOL = {"rtol": 1e-4, "atol": 1e-5}


def random_hf_model(path, model_class, config, seed=0, vary_norms=False):
    """``model_class(config)`` with weights larger than the default init, so that routing and logits
    vary (norm weights drawn from [0.5, 1.5] with ``vary_norms``: Qwen3's q/k norms matter),
    written to ``path`` by ``save_pretrained``."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    for name, p in model.named_parameters():
        if vary_norms and name.endswith("norm.weight"):
            torch.nn.init.uniform_(p, 0.5, 1.5)
        else:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(path)
    return model


def token_ids(vocab_size, shape=(3, 17), seed=1):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def assert_same_logits(actual, expected, x):
    """Equal logits for ``x`` (within ``TOL``) from two models, each tedmoe's or transformers'."""
    def logits(model):
        return model.logits(x) if isinstance(model, GPTMoE) else model(x).logits

    with torch.no_grad():
        torch.testing.assert_close(logits(actual), logits(expected), **TOL)


def imported(path):
    """The directory's config and a tedmoe model holding its weights."""
    cfg, state = hf.load(path)
    ours = GPTMoE(cfg, Topology.single()).eval()
    ours.load_state_dict(state)
    return cfg, ours


def assert_export_has_equal_logits(cfg, out, class_name, vary_norms=False):
    """A tedmoe model for ``cfg`` (weights x8, so routing and logits are far from uniform; norm
    weights drawn from [0.5, 1.5] with ``vary_norms``) exported to ``out`` loads into transformers
    as ``class_name`` with equal logits. Returns the exported config.json."""
    import transformers

    ours = GPTMoE(cfg, Topology.single()).eval()
    ours.init_weights(seed=3)
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
            elif vary_norms:
                p.uniform_(0.5, 1.5)
    out = hf.save(ours.state_dict(), cfg, out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == class_name
    x = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(2))
    assert_same_logits(ours, loaded, x)
    return json.loads((out / "config.json").read_text())


def assert_round_trip_keeps_the_tensors(path, out):
    """Import ``path`` then export it to ``out``: the same tensor names and values. Returns the
    imported config and ``out``."""
    cfg, state = hf.load(path)
    out = hf.save(state, cfg, out)
    a, b = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return cfg, out


def assert_greedy_generation_equal(model, path):
    """32 greedy tokens from transformers' ``generate`` equal tedmoe's, by recomputation and on
    the engine (KV cache), from the directory ``path`` holding ``model``."""
    from tedmoe.data.tokenizer import ByteTokenizer
    from tedmoe.inference.engine import InferenceEngine
    from tedmoe.inference.generate import generate, generate_batch, load_model
    from tedmoe.inference.sampling import SamplingParams

    (path / "tokenizer.json").write_text(hf.tokenizer_json(ByteTokenizer()))  # load_model wants one
    ours, _ = load_model(path, routing="dropless")
    prompt = [5, 17, 42, 8]
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[0].tolist()
    assert generate(ours, prompt, 32, greedy=True) == theirs
    engine = InferenceEngine(ours, block_size=8, num_blocks=16)
    assert generate_batch(engine, [prompt], 32, SamplingParams(temperature=0.0))[0] == theirs
    assert len(set(theirs[4:])) > 3  # not one token repeated


def assert_train_init_from_keeps_the_logits(tmp_path, capsys, model_class, config, *sets):
    """``tedmoe train --init-from DIR [--set ...]`` from ``model_class(config)`` (default init, seed
    0) written to ``DIR``: after one step at a negligible learning rate, ``tedmoe export`` gives a
    model with its logits. Returns that model (as transformers loads it) and what the export printed."""
    import transformers

    from tedmoe.cli import main

    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--init-from", str(tmp_path / "base"), "--out", str(out),
                 "--set", "train.max_steps=1", "--set", "train.warmup_steps=0", "--set", "train.lr=1e-12",
                 "--set", "model.moe.dropless=true", *[a for s in sets for a in ("--set", s)]]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))
    assert_same_logits(tuned, model, x)
    return tuned, printed
