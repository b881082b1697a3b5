"""Overrides as a user types them, made readable to Hydra's override grammar.

Run directories are named after their overrides (`...-pretrain-loss=precision,seed=1`), so
a path the tool printed holds `=` and `,`, which Hydra's grammar reads as syntax. Values of
the keys that take paths are quoted for Hydra here, so such a path works unquoted. Any other
value Hydra cannot read costs one line saying how to quote it.
"""

from __future__ import annotations

from pathlib import Path

from ntp_rl.errors import UserError

# Keys whose value is a file or directory (or a hub name): never Hydra syntax, always one string.
PATH_KEYS = {"model", "model.name_or_path", "init_from", "run_dir", "resume", "out_dir", "data.path",
             "data.cache_dir", "data.tokenizer", "task.path"}

# Characters Hydra reads as syntax in an unquoted value.
_SYNTAX = set("=,()[]{}'\"\\ \t")


def quote_path_values(args: list[str]) -> list[str]:
    """`init_from=outputs/rl/...-rl-loss=ce,seed=1` -> `init_from='outputs/rl/...-rl-loss=ce,seed=1'`.

    A comma list of existing paths stays a list (a sweep over runs), each path quoted.
    """
    quoted = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+~") in PATH_KEYS and _needs_quotes(value):
            parts = value.split(",")
            if not Path(value).exists() and len(parts) > 1 and all(Path(p).exists() for p in parts):
                value = ",".join(hydra_quote(p) for p in parts)
            else:
                value = hydra_quote(value)
            arg = f"{key}={value}"
        quoted.append(arg)
    return quoted


def _needs_quotes(value: str) -> bool:
    if value[:1] in ("'", '"'):
        return False  # quoted by the user already
    return any(c in value for c in _SYNTAX) or not value.isascii()


def hydra_quote(value: str) -> str:
    """A Hydra quoted string: single quotes, with the backslashes and quotes inside escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_parsable(args: list[str]) -> None:
    """Each override must parse alone; otherwise say, in one line, how to quote its value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue  # Hydra's flags, and their values, are argparse's business
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            key, _, value = arg.partition("=")
            raise UserError(f"{key}: Hydra cannot read the value {value!r} ($, =, commas, brackets, parentheses, "
                            f"quotes and non-ASCII characters are its syntax); quote it for Hydra inside the shell's "
                            f"quotes: {shell_hint(key, value)}") from None


def shell_hint(key: str, value: str) -> str:
    """What to type in a POSIX shell: Hydra's quotes inside the shell's, chosen so the shell expands nothing."""
    if "'" not in value:
        return "'" + key + '="' + value.replace("\\", "\\\\").replace('"', '\\"') + "\"'"
    return '"' + key + "=" + hydra_quote(value).replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`") + '"'
