"""Hydra composition: the config `ntp-rl <stage> <overrides>` runs, from conf/ and the schema."""

from __future__ import annotations

from typing import Any, Sequence

from hydra.core.config_store import ConfigStore

from ntp_rl.config.paths import conf_dir


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
            return settle_names(hydra_compose(config_name=stage, overrides=list(overrides), return_hydra_config=hydra))
    finally:
        GlobalHydra.instance().clear()


def settle_names(cfg: Any) -> Any:
    """Names derived from the numbers (the CLI calls this on each Hydra job too)."""
    if "loss" in cfg:  # the name shown and recorded follows the numbers, whatever preset they started from
        cfg.loss.name = loss_name(cfg.loss)
    return cfg


def loss_presets() -> dict[str, dict]:
    """Each conf/loss preset's numbers (its own keys over ce's, as its defaults list says)."""
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(OmegaConf.load(conf_dir() / "loss" / "ce.yaml"))
    presets = {}
    for path in sorted((conf_dir() / "loss").glob("*.yaml")):
        own = OmegaConf.to_container(OmegaConf.load(path))
        own.pop("defaults", None)
        presets[own.get("name", path.stem)] = {**base, **own}
    return presets


def loss_name(loss: Any) -> str:
    """The name a loss shows: the preset whose numbers it has, else "custom" (or a name of the user's own
    that is no preset's). So `loss=ce loss.beta=-0.25` is `precision`, and `loss=ce loss.beta=-0.1` is `custom`:
    a run's name never contradicts its settings.

    k counts only when lambda_top != lambda_tail (otherwise the top-k set changes nothing), and the
    positive form when beta != 0 or either form is `constant` (exponent and multiplicative are both
    1/p at beta 0; constant is 1).
    """
    form = loss.positive_form.value

    def same(preset: dict) -> bool:
        numbers = ["beta", "lambda_top", "lambda_tail"] + (["k"] if loss.lambda_top != loss.lambda_tail else [])
        form_counts = loss.beta != 0 or "constant" in (form, preset["positive_form"])
        return (not form_counts or form == preset["positive_form"]) and \
            all(float(loss[key]) == float(preset[key]) for key in numbers)

    presets = loss_presets()
    for name, preset in presets.items():
        if same(preset):
            return name
    return loss.name if loss.name not in presets else "custom"
