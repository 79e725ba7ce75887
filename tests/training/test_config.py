"""Tests of the loop's config section (src/dreamerv4/training/config.py).

    pytest tests/training/test_config.py -q -x
"""

from __future__ import annotations

import pytest

from dreamerv4.config import from_dict, load_config, to_dict
from dreamerv4.errors import ConfigError
from dreamerv4.run_config import RunConfig
from dreamerv4.training.config import RETIRED, TrainConfig, drop_retired


def test_bad_train_config_values_are_config_errors():
    with pytest.raises(ValueError, match="steps must be at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"tokenizer\.train: min_lr_ratio must be in \[0, 1\]"):
        load_config(RunConfig, None, ["tokenizer.train.min_lr_ratio=2"])


def test_a_checkpoint_config_with_retired_options_still_loads():
    stored = to_dict(RunConfig())
    stored["tokenizer"]["train"].update(ema_decay=0.0, fit_steps_to_time=False)  # as written before
    with pytest.raises(ConfigError, match="ema_decay"):
        from_dict(RunConfig, stored)
    assert from_dict(RunConfig, drop_retired(stored)) == RunConfig()
    assert set(RETIRED) == {"ema_decay", "fit_steps_to_time"}
    assert not set(RETIRED) & set(to_dict(TrainConfig()))
