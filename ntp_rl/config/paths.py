"""Where the config tree lives: a leaf, so that validation can read the presets without composing."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    """conf/ of the checkout this code runs from, else the copy installed as ntp_rl.conf."""
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "pretrain.yaml").exists():
        return checkout
    import ntp_rl.conf  # a wheel install: conf/ is shipped as this package (pyproject.toml)

    return Path(ntp_rl.conf.__path__[0]).resolve()
