"""`ntp-rl <stage> --help`: the stage's own config groups, presets and most used keys, generated
from the stage table, conf/<stage>.yaml and the comments of the config schema, so it cannot drift
from what the stage reads. (Hydra's generic page stays behind `--hydra-help`.)"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from enum import Enum
from typing import Any, Optional

from omegaconf import OmegaConf

from ntp_rl.config.compose import compose, conf_dir
from ntp_rl.stages import STAGES


def stage_groups(stage: str) -> list[tuple[str, str, str]]:
    """(key, group directory, default preset) of each config group conf/<stage>.yaml composes."""
    groups = []
    for entry in OmegaConf.to_container(OmegaConf.load(conf_dir() / f"{stage}.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            ((group, default),) = entry.items()
            directory, _, key = group.partition("@")
            groups.append((key or directory, directory, default))
    return groups


def field_comment(schema: type, dotted: str) -> str:
    """The comment beside a key's field in the config schema: its documented meaning."""
    owner: Optional[type] = schema
    parts = dotted.split(".")
    for part in parts[:-1]:
        hints = typing.get_type_hints(owner)
        owner = hints.get(part)
        if not dataclasses.is_dataclass(owner):
            return ""
    for cls in inspect.getmro(owner):
        if not dataclasses.is_dataclass(cls):
            continue
        source = inspect.getsource(cls)
        inline = re.search(rf"^\s+{re.escape(parts[-1])}:[^#\n]*#\s*(.+)$", source, re.M)
        if inline:
            return inline.group(1).strip()
        above = re.search(rf"((?:^[ \t]+#.*\n)+)^[ \t]+{re.escape(parts[-1])}:", source, re.M)
        if above:  # a comment block over the field: its first sentence
            text = " ".join(line.strip().lstrip("#").strip() for line in above.group(1).splitlines())
            return text.split(". ")[0].rstrip(".")
    return ""


def _shown(cfg: Any, key: str) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if OmegaConf.is_missing(node, leaf):
        return "(required)"
    value = node[leaf]
    if isinstance(value, Enum):  # shown as a user types it: wsd, not Schedule.wsd
        value = value.value
    return "null" if value is None else str(list(value) if OmegaConf.is_list(value) else value)


def stage_help(stage: str) -> str:
    spec = STAGES[stage]
    cfg = compose(stage, [])
    lines = [f"usage: ntp-rl {stage} [key=value ...] [-m (a sweep: key=a,b)] [--cfg job] [--hydra-help]", "",
             spec.summary, "", "config groups (group=preset; default first):"]
    for key, directory, default in stage_groups(stage):
        presets = sorted(p.stem for p in (conf_dir() / directory).glob("*.yaml"))
        first = [default] if default else []  # an optional group (experiment) has none
        lines.append(f"  {key + '=':<13} {', '.join([*first, *[p for p in presets if p != default]])}")
    lines += ["", "most used keys (default; meaning):"]
    for key in spec.keys:
        lines.append(f"  {key:<28} {_shown(cfg, key):<12} {field_comment(spec.schema, key)}")
    documented = ", ".join(dict.fromkeys(cls.__module__.replace(".", "/") + ".py" for cls in inspect.getmro(spec.schema)
                                         if dataclasses.is_dataclass(cls)))
    lines += ["", f"every key and its value: ntp-rl {stage} --cfg job; every key documented: {documented}"]
    return "\n".join(lines)
