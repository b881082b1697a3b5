"""The figures' words and ticks: plain numbers on log axes, settings as legend labels, honest bands."""

import re

import pytest

from ntp_rl import plots
from ntp_rl.stats import mean_ci


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """plot_curves' figure, drawn but kept open for inspection instead of saved."""
    figures = []

    def keep(fig, path):
        fig.canvas.draw()
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield figures
    for fig in figures:
        plots.plt.close(fig)


def tick_texts(axis):
    return [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]


def test_log_axes_have_plain_tick_labels(drawn, tmp_path):
    # 0.45 .. 0.9: less than a decade, where matplotlib would write 5x10^-1, 6x10^-1, ...
    curves = {"train/nll": {"loss=ce": {1: [0.9], 2: [0.7], 3: [0.45]}}}
    plots.plot_curves(tmp_path / "c.png", curves, "step", {}, "t", log_y=True)
    (ax,) = drawn[0].axes
    labels = tick_texts(ax.yaxis)
    assert len(labels) >= 3 and all(re.fullmatch(r"\d+(\.\d+)?", label) for label in labels), labels
    assert "0.6" in labels


def test_band_is_the_95_percent_interval_and_one_seed_claims_none(drawn, tmp_path):
    values = [0.2, 0.3, 0.25]
    plots.plot_curves(tmp_path / "a.png", {"reward": {"loss=ce": {1: values, 2: values}}}, "step", {}, "RL")
    plots.plot_curves(tmp_path / "b.png", {"reward": {"loss=ce": {1: [0.2], 2: [0.3]}}}, "step", {}, "RL")
    banded, single = drawn
    assert "band = 95% CI of the mean" in banded._suptitle.get_text()
    (band,) = banded.axes[0].collections
    ys = band.get_paths()[0].vertices[:, 1]
    m = mean_ci(values)
    assert ys.min() == pytest.approx(m.low) and ys.max() == pytest.approx(m.high)
    assert "one seed per setting, no band" in single._suptitle.get_text() and not single.axes[0].collections
    assert "min" not in single._suptitle.get_text()


def test_legend_names_the_setting_not_a_path(drawn, tmp_path):
    long = "init_from=" + "outputs/pretrain/20261128-124035-pretrain-loss=precision" * 2
    plots.plot_curves(tmp_path / "c.png", {"reward": {long: {1: [0.1], 2: [0.2]}}}, "step", {}, "RL")
    (text,) = [t.get_text() for t in drawn[0].axes[0].get_legend().get_texts()]
    assert len(text) <= plots.LEGEND_CHARS and text.endswith("…")
