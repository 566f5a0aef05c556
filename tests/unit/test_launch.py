"""Launch helpers that need no process group: adopting a SLURM task's environment."""

from tedmoe.parallel.launch import adopt_slurm_env


def test_slurm_environment_is_adopted():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.5"}
    adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("3", "8", "1", "10.0.0.5", "29500")
    torchrun = {"RANK": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "8"}
    adopt_slurm_env(torchrun)
    assert torchrun["RANK"] == "0" and "WORLD_SIZE" not in torchrun
