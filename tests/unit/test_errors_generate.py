"""`tedmoe generate`, `tedmoe serve`, `tedmoe plot` and `tedmoe demo` refuse bad input in one line with exit code 2."""

import os

import pytest

from tedmoe.cli import main
from tedmoe.config import load_run_config
from tedmoe.runtime.trainer import data_dir, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    os.environ["TEDMOE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    out = tmp_path_factory.mktemp("run") / "r"
    cfg = load_run_config(None, "tiny", ["train.max_steps=2", f'out_dir="{out}"'])
    train(cfg)
    yield out
    os.environ.pop("TEDMOE_CACHE")


def cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def one_line(code, captured, message):
    err = captured.err.splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("tedmoe: error: "), err
    assert message in err[0], err[0]


GENERATE = [  # (args with {run}, {ds}, {tmp}; message)
    (["--prompt", ""], "the prompt is empty; give at least one character with --prompt"),
    (["--prompt", "a", "--top-k", "0"], "argument --top-k: 0 must be >= 1"),
    (["--prompt", "a", "--top-k", "-3"], "argument --top-k: -3 must be >= 1"),
    (["--prompt", "a", "--temperature", "0"], "argument --temperature: 0 must be > 0"),
    (["--prompt", "a", "--temperature", "inf"], "argument --temperature: inf must be > 0"),
    (["--prompt", "a", "--temperature", "hot"], "argument --temperature: 'hot' is not a number"),
    (["--prompt", "a", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 must be >= 1"),
    (["--prompt", "a", "--seed", "-1"], "argument --seed: -1 must be >= 0"),
    (["--prompt", "a", "--ckpt", "{tmp}/nope"], "does not exist; pass a run directory or a checkpoint directory"),
    (["--prompt", "a", "--ckpt", "{ds}"], "is a prepared dataset, not a checkpoint"),
    (["--prompt", "a", "--ckpt", "{run}/metrics.jsonl"], "no complete checkpoint at"),
    (["--prompt", "a", "--ckpt", "{tmp}"], "no complete checkpoint at"),
]




SERVE = [  # generate and serve share the engine options; serve checks them before it loads or binds
    (["--set", "model.hidden_size=8"], "--set model.hidden_size=8: serve takes only parallel.* settings"),
    (["--set", "parallel.tp=3"], "tp=3 does not divide world_size=1"),
    (["--set", "parallel.sp=2"], "generation runs TP x EP layouts; leave parallel.sp=1"),
    (["--nproc", "0"], "argument --nproc: 0 must be >= 1"),
    (["--kv-memory-gib", "0"], "argument --kv-memory-gib: 0 must be > 0"),
    (["--block-size", "0"], "argument --block-size: 0 must be >= 1"),
    (["--policy", "fast"], "argument --policy: invalid choice: 'fast'"),
    (["--port", "-1"], "argument --port: -1 must be >= 0"),
    (["--port", "70000"], "argument --port: 70000 is not a TCP port (0-65535; 0 picks a free one)"),
    (["--token-budget", "0"], "argument --token-budget: 0 must be >= 1"),
    (["--max-seqs", "0"], "argument --max-seqs: 0 must be >= 1"),
    (["--routing", "any"], "argument --routing: invalid choice: 'any'"),
    (["--ckpt", "{tmp}/nope"], "does not exist; pass a run directory or a checkpoint directory"),
]


ENGINE = [("generate", *g) for g in GENERATE] + [("serve", *g) for g in SERVE]


@pytest.mark.parametrize("command,args,message", ENGINE, ids=[f"{c} {' '.join(a)}" for c, a, _ in ENGINE])
def test_bad_generate_and_serve_input_is_one_line(capsys, run_dir, tmp_path, command, args, message):
    ds = data_dir(load_run_config(None, "tiny"))
    args = [a.format(run=run_dir, ds=ds, tmp=tmp_path) for a in args]
    if "--ckpt" not in args:
        args += ["--ckpt", str(run_dir)]
    one_line(*cli(capsys, command, *args), message)


def test_generate_works_on_the_same_run(capsys, run_dir):
    code, captured = cli(capsys, "generate", "--ckpt", run_dir, "--prompt", "def", "--max-new-tokens", "5", "--greedy")
    assert code == 0 and captured.out.startswith("def"), captured


PLOT = [
    ("{tmp}/nope", "nope/metrics.jsonl does not exist; is"),
    ("{tmp}", "metrics.jsonl does not exist; is"),
    ("{tmp}/file.txt", "file.txt/metrics.jsonl does not exist"),
    ("{tmp}/empty", "metrics.jsonl has no training steps yet"),
]


@pytest.mark.parametrize("where,message", PLOT, ids=[p[0] for p in PLOT])
def test_bad_plot_input_is_one_line(capsys, tmp_path, where, message):
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    one_line(*cli(capsys, "plot", where.format(tmp=tmp_path)), message)
    assert (tmp_path / "file.txt").read_text() == "mine"


@pytest.mark.parametrize("args,message", [
    (["demo", "--nproc", "0"], "demo: argument --nproc: 0 must be >= 1"),
    (["demo", "--nproc", "x"], "demo: argument --nproc: 'x' is not an integer"),
    (["demo", "--tp", "2"], "unrecognized arguments: --tp 2"),
    ([], "the following arguments are required: command"),
    (["trian"], "argument command: invalid choice: 'trian'"),
    (["data"], "the following arguments are required: data_command"),
    (["plot"], "the following arguments are required: run_dir"),
])
def test_bad_commands_are_one_line(capsys, args, message):
    one_line(*cli(capsys, *args), message)
