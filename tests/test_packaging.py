"""The package ships everything it needs, including the config tree, in a non-editable install too."""

import tomllib

from conftest import REPO


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ntp_rl").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"


def test_every_stage_has_a_config_and_every_group_option_parses():
    from omegaconf import OmegaConf

    conf = REPO / "conf"
    for path in conf.rglob("*.yaml"):
        OmegaConf.load(path)
    assert (conf / "pretrain.yaml").exists()
    for group in ("model", "data", "loss", "optim", "logger"):
        assert any((conf / group).glob("*.yaml")), group


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((REPO / "scripts" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"ddp", "fsdp", "multinode"}
    for path in configs:
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1 and config.mixed_precision == "bf16", path.name
