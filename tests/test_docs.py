"""The README is a landing page that cannot rot: every command it shows parses and composes."""

import re
import shlex

import pytest

from conftest import REPO
from ntp_rl.cli import expand_model_paths, main
from ntp_rl.config.compose import compose
from ntp_rl.overrides import quote_path_values
from ntp_rl.stages import STAGES


def readme_commands() -> list[list[str]]:
    """`ntp-rl ...` and `accelerate launch ... -m ntp_rl ...` lines of the README's code blocks, as argv."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["ntp-rl"]:
            commands.append(words[1:])
        elif "ntp_rl" in words and words[:2] == ["accelerate", "launch"]:
            commands.append(words[words.index("ntp_rl") + 1:])
    return commands


def as_typed(args: list[str]) -> list[str]:
    """What a user types for the README's placeholders (`<run>` -> a run's name), and a sweep's first point
    (`-m loss=ce,precision seed=0,1` -> `loss=ce seed=0`)."""
    args = [re.sub(r"<[^>]+>", "20261206-120000-run", a) for a in args]
    if "-m" not in args:
        return args
    return [re.sub(r"^([\w.]+)=([^\[\]{},]+),.*$", r"\1=\2", a) for a in args if a != "-m"]


COMMANDS = readme_commands()


def test_the_readme_is_a_landing_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
    assert len(COMMANDS) >= 8


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_command_the_readme_shows_composes(argv, capsys):
    stage, args = argv[0], argv[1:]
    if stage.startswith("experiment="):  # `ntp-rl experiment=X` is a pipeline sweep (ntp_rl/cli.py)
        stage, args = "pipeline", argv
    if args[:1] == ["--help"] or "-h" in args:
        main(argv)
        assert capsys.readouterr().out
        return
    assert stage in STAGES, f"{stage}: not a stage"
    if STAGES[stage].schema is None:  # compare: plain arguments
        with pytest.raises(SystemExit) as done:
            main([stage, "--help"])
        assert done.value.code == 0
        return
    cfg = compose(stage, quote_path_values(expand_model_paths(as_typed(args))))
    assert cfg.stage == stage


def test_every_docs_page_is_in_the_site_nav():
    """`mkdocs build --strict` (CI's docs step, after the first test run) fails on a page left out of the nav;
    this catches it in the first run, without the docs extra."""
    import yaml  # omegaconf depends on PyYAML
    listed = set(re.findall(r"[\w./-]+\.md", yaml.safe_dump(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])))
    pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert pages - listed == set(), "docs pages missing from mkdocs.yml's nav"
    assert listed - pages == set(), "mkdocs.yml's nav names pages that do not exist"
