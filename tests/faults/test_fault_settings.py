"""Out-of-range loss settings are refused when the module is built, before any model loads."""

from __future__ import annotations

import pytest

from cppo_lightning.module import CPPOModule


def test_a_negative_kl_coef_is_refused_at_construction():
    """A negative model.kl_coef is refused by the constructor with a message naming the key, the
    value and the allowed range."""
    with pytest.raises(ValueError, match=r"model\.kl_coef must be >= 0.*got -1"):
        CPPOModule(kl_coef=-1.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clip_low": -0.5}, r"model\.clip_low.*\[0, 1\).*-0\.5"),
        ({"clip_low": 1.0}, r"model\.clip_low.*\[0, 1\).*1\.0"),
        ({"clip_high": -0.1}, r"model\.clip_high.*>= 0.*-0\.1"),
    ],
)
def test_invalid_clip_ranges_are_refused_at_construction(settings, message):
    """Clip ranges that the policy loss would refuse mid-training (clip_low outside [0, 1),
    clip_high < 0) are refused by the module's constructor instead."""
    with pytest.raises(ValueError, match=message):
        CPPOModule(**settings)


def test_valid_settings_still_construct():
    """kl_coef 0 and the edge clip values the loss accepts still build a module."""
    CPPOModule(kl_coef=0.0, clip_low=0.0, clip_high=0.0, dual_clip=None)


def test_the_cli_refuses_a_negative_kl_coef_before_training(capsys):
    """`--model.kl_coef -1` on the command line fails while the CLI builds the module (nothing is
    trained) and the message names the key."""
    from cppo_lightning.cli import main
    from tests.config.test_configs import BASE

    with pytest.raises((ValueError, SystemExit)) as raised:
        main(["--config", str(BASE), "--model.kl_coef", "-1", "--trainer.logger=false"], run=False)
    assert "model.kl_coef must be >= 0" in str(raised.value) + capsys.readouterr().err
