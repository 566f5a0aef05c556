"""`tedmoe plan` refuses every bad input in one line with exit code 2."""

import pytest

from tedmoe.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    (d / "bad.toml").write_text("[model\n")
    (d / "notable.toml").write_text("seed = 1\n")
    (d / "badtype.toml").write_text('[model]\nnum_layers = "x"\n')
    (d / "unknown.toml").write_text("[model]\nlayers = 4\n")
    (d / "dropless.toml").write_text("[model]\nhidden_size = 256\nnum_heads = 4\n[model.moe]\ndropless = true\n")
    (d / "hw_missing.toml").write_text('name = "x"\n')
    (d / "hw_type.toml").write_text('gpus_per_node = 4\npeak_flops = "fast"\nmemory_bytes = 1e10\n'
                                    "intra_bw = 1e11\ninter_bw = 1e10\n")
    (d / "hw_unknown.toml").write_text("gpus = 4\n")
    (d / "hw_bad.toml").write_text("gpus_per_node = \n")
    return d


BAD = [  # (args with {d} for the files' directory, message)
    ("--global-batch 0", "argument --global-batch: 0 must be >= 1"),
    ("--gpus 0", "argument --gpus: 0 must be >= 1"),
    ("--gpus -4", "argument --gpus: -4 must be >= 1"),
    ("--gpus many", "argument --gpus: 'many' is not an integer"),
    ("--micro-batch 0", "argument --micro-batch: 0 must be >= 1"),
    ("--seq-len 0", "argument --seq-len: 0 must be >= 1"),
    ("--experts 0", "argument --experts: 0 must be >= 1"),
    ("--memory-gib 0", "argument --memory-gib: 0 must be > 0"),
    ("--memory-gib nan", "argument --memory-gib: nan must be > 0"),
    ("--memory-gib -1", "argument --memory-gib: -1 must be > 0"),
    ("--tp 0", "argument --tp: 0 must be >= 1"),
    ("--ep 0", "argument --ep: 0 must be >= 1"),
    ("--checkpointing some", "argument --checkpointing: invalid choice: 'some'"),
    ("--zero-stage 4", "argument --zero-stage: invalid choice: 4 (choose from 1, 2, 3)"),
    ("--offload nvme", "argument --offload: invalid choice: 'nvme'"),
    ("--tp 3", "tp=3 does not divide world_size=128"),
    ("--ep 5", "ep=5 does not divide the data-parallel size dp=128"),
    ("--experts 15 --ep 2 --tp 1", "num_experts=15 is not divisible by ep=2"),
    ("--global-batch 100 --tp 1 --ep 1", "--global-batch=100 is not a multiple of --micro-batch=1 x dp=128 = 128; make it a multiple of 128"),
    ("--global-batch 512 --micro-batch 3", "no layout of 128 GPUs suits this model and batch"),
    ("--model 99b", "unknown model '99b'; use one of 1.3b, 2.7b, 6.7b, 13b or a TOML file"),
    ("--model missing.toml", "model file missing.toml does not exist"),
    ("--model {d}/bad.toml", "is not valid TOML"),
    ("--model {d}/notable.toml", "has no [model] table"),
    ("--model {d}/badtype.toml", "model.num_layers='x' is not allowed: it must be an integer >= 1"),
    ("--model {d}/unknown.toml", "unknown config key 'model.layers'"),
    ("--model {d}/dropless.toml", "the planner predicts capacity-mode MoE layers only"),
    ("--hardware tpu", "unknown hardware 'tpu': use one of summit, perlmutter"),
    ("--hardware {d}/hw_missing.toml", "lacks gpus_per_node, peak_flops, memory_bytes, intra_bw, inter_bw"),
    ("--hardware {d}/hw_type.toml", "peak_flops='fast' is not allowed: it must be a finite number > 0"),
    ("--hardware {d}/hw_unknown.toml", "unknown hardware keys ['gpus']"),
    ("--hardware {d}/hw_bad.toml", "is not valid TOML"),
    ("--model 13b --gpus 8 --memory-gib 1", "no layout fits in 1.0 GiB per device"),
    ("--model 13b --gpus 6", "no layout of 6 GPUs suits this model and batch"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_plan_input_is_one_line(capsys, files, args, message):
    code = main(["plan", *args.format(d=files).split()])
    err = capsys.readouterr().err.splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("tedmoe: error: "), err
    assert message in err[0], err[0]
