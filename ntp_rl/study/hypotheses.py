"""Pre-registered hypotheses, judged by the study's own tables: `ntp-rl compare ... --hypotheses FILE`.

A researcher writes down, before the runs, what each finding predicts and how it will be
judged; compare then reads the verdicts off the tables it computes anyway (the paired tests
against the baseline with their adjusted p-values (Holm by default), the means' intervals, the predictors),
so the verdicts cannot drift from the numbers and nobody re-judges them by eye afterwards.

A file (YAML) lists hypotheses; each names one metric (a column of compare.md) and one rule:

- `direction: {<setting>: greater | less, ...}`: each setting against the baseline. Holds when the
  adjusted p < alpha in the stated direction, fails when it is < alpha the other way.
- `within: <margin>`: every setting about the same as the baseline. Holds when each difference's
  95% interval lies inside (-margin, +margin); fails when an interval lies wholly outside it (a
  difference larger than the margin, beyond doubt); cannot tell while an interval straddles it.
- `sign: greater | less` (optional `settings: [...]`, default all): in each setting the metric's
  mean is above (below) zero: holds when its 95% interval excludes zero on that side.
- `predicts: Avg@n | pass@k`: which pre-RL diagnostic correlates most with that RL gain; reported
  with its rank correlation, interval and adjusted p, not judged.

Every other outcome is "cannot tell". Entries that share an `id` form one finding: it holds when
every part holds, fails when any part fails, and cannot tell otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ntp_rl.config.paths import conf_dir
from ntp_rl.errors import DataError
from ntp_rl.stats import ALPHA, MeanCI
from ntp_rl.study.predictors import Predictors
from ntp_rl.study.report import ADJUSTMENT_NAMES, format_p
from ntp_rl.study.table import Comparison, Study, label_matches

HOLDS, FAILS, CANNOT_TELL, REPORTED = "holds", "fails", "cannot tell", "reported"
RULES = ("direction", "within", "sign", "predicts")
DIRECTIONS = ("greater", "less")
GAINS = ("Avg@n", "pass@k")
# Files shipped with ntp-rl, named without their path: conf/preregistered/<name>.yaml.
PACKAGED = "preregistered"


@dataclass
class Hypothesis:
    id: str
    finding: str
    metric: str  # a compare column; for `predicts`, the gain ("Avg@n" or "pass@k")
    rule: str
    directions: dict[str, str] = field(default_factory=dict)  # setting -> greater/less ("direction", "sign")
    margin: float = math.nan  # "within"


@dataclass
class Part:
    """One hypothesis judged for one setting (or, for `predicts`, the strongest predictor)."""

    hypothesis: Hypothesis
    setting: str
    verdict: str
    evidence: str  # the numbers the verdict was read from
    expected: str = ""  # what the rule asked of this setting: "greater", "within ±0.02", ...


@dataclass
class Preregistration:
    path: str
    baseline: Optional[str]
    hypotheses: list[Hypothesis]


def resolve(name_or_path: str) -> Path:
    """A YAML path, or the name of a file shipped in conf/preregistered/ ("rl_study")."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise DataError(f"compare: --hypotheses {name_or_path}: no such file")
        return path
    shipped = conf_dir() / PACKAGED  # the config tree the stages compose from, not another install's
    packaged = shipped / f"{name_or_path}.yaml"
    if not packaged.is_file():
        names = sorted(p.stem for p in shipped.glob("*.yaml"))
        raise DataError(f"compare: --hypotheses {name_or_path}: neither a YAML file nor a shipped one "
                        f"({', '.join(names)})")
    return packaged


def load(name_or_path: str) -> Preregistration:
    """The file's hypotheses, checked: a mistake is one line naming the file and the entry."""
    import yaml

    path = resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: not readable as YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("hypotheses"), list) or not raw["hypotheses"]:
        raise DataError(f"{path}: expected a mapping with a non-empty list under 'hypotheses'")
    unknown = set(raw) - {"baseline", "hypotheses"}
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected baseline, hypotheses")
    baseline = raw.get("baseline")
    return Preregistration(str(path), None if baseline is None else str(baseline),
                           [_hypothesis(path, i, entry) for i, entry in enumerate(raw["hypotheses"])])


def _hypothesis(path: Path, index: int, entry: Any) -> Hypothesis:
    where = f"{path}: hypotheses[{index}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping with id, finding, metric and one rule ({', '.join(RULES)})")
    rules = [r for r in RULES if r in entry]
    if len(rules) != 1:
        raise DataError(f"{where}: needs exactly one rule of {', '.join(RULES)}; found {', '.join(rules) or 'none'}")
    rule = rules[0]
    allowed = {"id", "finding", "metric", "settings", rule}
    unknown = set(entry) - allowed
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(allowed))}")
    for key in ("id", "finding"):
        if entry.get(key) in (None, ""):
            raise DataError(f"{where}: '{key}' is missing")
    value = entry[rule]
    hypothesis = Hypothesis(id=str(entry["id"]), finding=str(entry["finding"]),
                            metric=str(entry.get("metric") or ""), rule=rule)
    if rule != "predicts" and not hypothesis.metric:
        raise DataError(f"{where}: 'metric' is missing (a column of compare.md, such as 'rl avg@8')")
    if rule == "direction":
        if not isinstance(value, dict) or not value or any(v not in DIRECTIONS for v in value.values()):
            raise DataError(f"{where}: direction must map settings to greater or less, "
                            "e.g. {loss=precision: greater}")
        hypothesis.directions = {str(k): str(v) for k, v in value.items()}
    elif rule == "within":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise DataError(f"{where}: within must be a positive margin in the metric's units, got {value!r}")
        hypothesis.margin = float(value)
    elif rule == "sign":
        if value not in DIRECTIONS:
            raise DataError(f"{where}: sign must be greater or less, got {value!r}")
        settings = entry.get("settings")
        if settings is not None and (not isinstance(settings, list) or not settings):
            raise DataError(f"{where}: settings must be a non-empty list of settings")
        hypothesis.directions = {str(s): value for s in settings} if settings else {"*": value}
    else:
        if value not in GAINS:
            raise DataError(f"{where}: predicts must be one of {', '.join(GAINS)}, got {value!r}")
        hypothesis.metric = value
    if "settings" in entry and rule != "sign":
        raise DataError(f"{where}: 'settings' goes with the sign rule only")
    return hypothesis


def judge(prereg: Preregistration, study: Study, means: dict[str, dict[str, MeanCI]],
          comparisons: Sequence[Comparison], predictors: Optional[Predictors]) -> list[Part]:
    parts: list[Part] = []
    for h in prereg.hypotheses:
        if h.rule == "predicts":
            parts.append(_strongest_predictor(h, predictors))
            continue
        if h.rule == "sign":
            targets = list(study.settings) if "*" in h.directions else list(h.directions)
        elif h.rule == "within":
            targets = list(study.settings[1:])
        else:
            targets = list(h.directions)
        if not targets:
            parts.append(Part(h, "-", CANNOT_TELL, "no setting besides the baseline"))
        for name in targets:
            setting = _find(name, study.settings)
            wanted = h.directions.get(name, h.directions.get("*", ""))
            if setting is None:
                part = Part(h, name, CANNOT_TELL, "no finished lineage of this setting (or it matches several)")
            elif h.rule == "sign":
                part = _sign(h, setting, wanted, means)
            else:
                found = next((c for c in comparisons if c.metric == h.metric and c.setting == setting), None)
                part = _against_baseline(h, setting, wanted, found)
            part.expected = {"direction": f"{wanted} than the baseline",
                             "within": f"within ±{h.margin:g} of the baseline", "sign": f"{wanted} than 0"}[h.rule]
            parts.append(part)
    return parts


def _find(name: str, settings: Sequence[str]) -> Optional[str]:
    matches = [s for s in settings if label_matches(s, name)]
    return matches[0] if len(matches) == 1 else None


def _against_baseline(h: Hypothesis, setting: str, wanted: str, c: Optional[Comparison]) -> Part:
    if c is None:
        return Part(h, setting, CANNOT_TELL, f"no '{h.metric}' in both this setting and the baseline")
    r = c.result
    interval = "" if math.isnan(r.low) else f" [{r.low:+.4f}, {r.high:+.4f}]"
    if r.test == "paired t":
        evidence = f"{r.diff:+.4f}{interval}, p {format_p(r.p)}, adjusted {format_p(c.p_adjusted)} ({r.n} pairs)"
    else:
        evidence = f"{r.diff:+.4f}{interval}, {r.test or 'no test'}, adjusted p {format_p(c.p_adjusted)}"
    if h.rule == "within":
        m = h.margin
        if math.isnan(r.low):
            return Part(h, setting, CANNOT_TELL, evidence + f"; no interval to set against ±{m:g}")
        if -m < r.low and r.high < m:
            return Part(h, setting, HOLDS, evidence + f"; inside ±{m:g}")
        if r.low >= m or r.high <= -m:
            return Part(h, setting, FAILS, evidence + f"; wholly outside ±{m:g}")
        return Part(h, setting, CANNOT_TELL, evidence + f"; straddles ±{m:g}")
    if math.isnan(c.p_adjusted) or c.p_adjusted >= ALPHA:
        return Part(h, setting, CANNOT_TELL, evidence)
    return Part(h, setting, HOLDS if (r.diff > 0) == (wanted == "greater") else FAILS, evidence)


def _sign(h: Hypothesis, setting: str, wanted: str, means: dict[str, dict[str, MeanCI]]) -> Part:
    m = means.get(setting, {}).get(h.metric)
    if m is None:
        return Part(h, setting, CANNOT_TELL, f"no '{h.metric}' in this setting")
    if math.isnan(m.low):
        return Part(h, setting, CANNOT_TELL, f"{m.mean:+.4f} from {m.n} seed(s): no interval")
    evidence = f"{m.mean:+.4f} [{m.low:+.4f}, {m.high:+.4f}] over {m.n} seeds"
    above, below = m.low > 0, m.high < 0
    if not (above or below):
        return Part(h, setting, CANNOT_TELL, evidence)
    return Part(h, setting, HOLDS if above == (wanted == "greater") else FAILS, evidence)


def _strongest_predictor(h: Hypothesis, predictors: Optional[Predictors]) -> Part:
    pairs = [p for p in (predictors.pairs if predictors else [])
             if p.gain == h.metric and not math.isnan(p.correlation.rho)]
    if not pairs:
        return Part(h, "all lineages", REPORTED, f"no diagnostic can be related to the {h.metric} gain")
    best = max(pairs, key=lambda p: abs(p.correlation.rho))
    c = best.correlation
    interval = "" if math.isnan(c.low) else f" [{c.low:+.2f}, {c.high:+.2f}]"
    note = " (measured on the same samples as the gain's start: part of it is regression to the mean)" \
        if best.predictor.shares_samples else ""
    return Part(h, "all lineages", REPORTED, expected=f"strongest predictor of the {h.metric} gain",
                evidence=f"{best.predictor.name}: Spearman rho {c.rho:+.2f}{interval}, n {c.n}, "
                         f"BH-adjusted p {format_p(best.p_adjusted)}{note}")


def overall(parts: Sequence[Part]) -> str:
    verdicts = {p.verdict for p in parts}
    if verdicts == {REPORTED}:
        return REPORTED
    if FAILS in verdicts:
        return FAILS
    return HOLDS if verdicts == {HOLDS} else CANNOT_TELL


def write_verdicts(out_dir: Path, prereg: Preregistration, baseline: Optional[str], parts: Sequence[Part],
                   adjustment: str = "holm") -> str:
    """verdicts.csv (a row per part) and verdicts.md (a finding per line, then its parts); returns the markdown."""
    import csv

    with open(out_dir / "verdicts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "finding", "metric", "expected", "setting", "verdict", "evidence"])
        for p in parts:
            writer.writerow([p.hypothesis.id, p.hypothesis.finding, p.hypothesis.metric, p.expected, p.setting,
                             p.verdict, p.evidence])
    by_id: dict[str, list[Part]] = {}
    for p in parts:
        by_id.setdefault(p.hypothesis.id, []).append(p)
    lines = ["# Verdicts on the pre-registered hypotheses", "",
             f"From {prereg.path}, against the baseline {baseline}. Against the baseline: paired t by seed (Welch "
             f"where the seeds differ), p adjusted with {ADJUSTMENT_NAMES[adjustment]} within each metric, at {ALPHA}; "
             "'within' needs each difference's 95% interval inside the margin; 'sign' needs the setting's own 95% "
             "interval to exclude zero.", "",
             "| finding | verdict |", "|---|---|"]
    lines += [f"| {group[0].hypothesis.id}. {group[0].hypothesis.finding} | **{overall(group)}** |"
              for group in by_id.values()]
    lines += ["", "| finding | metric | expected | setting | verdict | evidence |", "|---|---|---|---|---|---|"]
    for p in parts:
        lines.append(f"| {p.hypothesis.id} | {p.hypothesis.metric} | {p.expected} | {p.setting} | {p.verdict} | "
                     f"{p.evidence} |")
    text = "\n".join(lines) + "\n"
    (out_dir / "verdicts.md").write_text(text)
    return text

