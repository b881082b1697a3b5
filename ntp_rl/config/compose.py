"""Hydra composition: the config `ntp-rl <stage> <overrides>` runs, from conf/ and the schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore


def conf_dir() -> Path:
    """conf/ of the checkout this code runs from, else the copy installed as ntp_rl.conf."""
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "pretrain.yaml").exists():
        return checkout
    import ntp_rl.conf  # a wheel install: conf/ is shipped as this package (pyproject.toml)

    return Path(ntp_rl.conf.__path__[0]).resolve()


def register_schemas() -> None:
    """Make each stage's dataclass (from the stage table) available to its YAML as `<stage>_schema`."""
    from ntp_rl.stages import STAGES

    store = ConfigStore.instance()
    for name, stage in STAGES.items():
        if stage.schema is not None:
            store.store(name=f"{name}_schema", node=stage.schema)


def compose(stage: str, overrides: Sequence[str] = (), hydra: bool = False) -> Any:
    """The config `ntp-rl <stage> <overrides>` would run, composed without Hydra's app (for tests and
    pipelines); with hydra=True, Hydra's own section too (the sweeper and launcher a sweep uses)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name=stage, overrides=list(overrides), return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()
