"""`dreamerv4 info`: inspect a run config and the models it builds.

    dreamerv4 info params --config configs/crafter-small.yaml [tokenizer.model.encoder.depth=4 ...]

`params` prints the tokenizer's parameter counts next to the reference arithmetic
(models/summary.py, `tokenizer_report`).
"""

from __future__ import annotations

import argparse

from dreamerv4.config import load_config
from dreamerv4.models.summary import tokenizer_report
from dreamerv4.run_config import RunConfig


def cmd_params(args: argparse.Namespace) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    print(tokenizer_report(cfg.tokenizer.model))
    return 0
