"""The `dreamerv4` command line. Every command is documented in README.md.

    dreamerv4 run --config configs/crafter-small.yaml [key=value ...]
    dreamerv4 report runs/crafter-small [--out report.html]
    dreamerv4 data crafter --episodes 20 --out data/crafter
    dreamerv4 data validate data/crafter
    dreamerv4 data convert-minerl SRC DST
    dreamerv4 data convert-vpt SRC DST [--workers N]
    dreamerv4 data shard data/minerl data/minerl-shards
    dreamerv4 train tokenizer --config configs/crafter-small.yaml [--resume] [key=value ...]
    dreamerv4 eval tokenizer --checkpoint runs/x/tokenizer/checkpoint.pt --data data/crafter
    dreamerv4 data tokenize --checkpoint runs/x/tokenizer/checkpoint.pt --data data/crafter --out runs/x/latents
    dreamerv4 train dynamics --config configs/crafter-small.yaml [--resume] [key=value ...]
    dreamerv4 eval dynamics --checkpoint runs/x/dynamics/checkpoint.pt --data data/crafter-heldout
    dreamerv4 train agent --config configs/crafter-small.yaml [--resume] [key=value ...]
    dreamerv4 eval agent --checkpoint runs/x/agent/checkpoint.pt --data data/crafter-heldout
    dreamerv4 eval crafter --checkpoint runs/x/agent/checkpoint.pt --episodes 100
    dreamerv4 eval compare runs/x/eval/crafter_imagine.json runs/x/eval/crafter_bc.json
    dreamerv4 train imagine --config configs/crafter-small.yaml [--resume] [key=value ...]
    dreamerv4 eval imagination --checkpoint runs/x/imagine/checkpoint.pt --data data/crafter-heldout
    dreamerv4 info params --config configs/minerl.yaml
    dreamerv4 play --run runs/crafter-small [--port 8000]

Handlers live next to the code they drive and are imported lazily ("module:function"), so
`dreamerv4 --help` does not pay for importing torch. A handler takes the parsed arguments and
returns the exit status; a UserError becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dreamerv4.errors import UserError


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. tokenizer.train.steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamerv4", description=__doc__.split("\n")[0])
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = groups.add_parser("run", help="run every stage of the pipeline into one run folder")
    _config_args(p)
    p.add_argument("--until", default=None, metavar="STAGE",
                   help="stop after this stage (see `dreamerv4.pipeline`; e.g. eval_tokenizer)")
    p.set_defaults(handler="dreamerv4.pipeline:cmd_run")

    p = groups.add_parser("report", help="(re)write a run folder's report.html from what the run left on disk")
    p.add_argument("run", help="run folder (the config's out_dir)")
    p.add_argument("--out", default=None, help="write the page here instead; the run folder is then only read")
    p.set_defaults(handler="dreamerv4.evaluation.report:cmd_report")

    data = groups.add_parser("data", help="record, convert and validate episode folders").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND"
    )
    p = data.add_parser("crafter", help="play the real Crafter game and record episodes")
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--out", required=True, help="destination folder (episodes go in DIR/episode_XXXXX)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="random", help="data-collection policy (see `dreamerv4.data.crafter_record`)")
    p.add_argument("--max-steps", type=int, default=10000, help="episode length cap (Crafter's default 10000)")
    p.add_argument("--overwrite", action="store_true", help="replace episodes already in --out")
    p.set_defaults(handler="dreamerv4.data.crafter_record:cmd_record")

    p = data.add_parser("validate", help="check every episode in a folder and print a summary")
    p.add_argument("dir")
    p.add_argument("--json", default=None, help="also write the summary as JSON here")
    p.set_defaults(handler="dreamerv4.data.episodes:cmd_validate")

    p = data.add_parser("convert-minerl", help="convert MineRL v0.4 episode folders to the extracted layout")
    p.add_argument("src", help="a MineRL episode folder, or a folder of them")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true", help="replace destination episodes that exist")
    p.set_defaults(handler="dreamerv4.data.minerl_convert:cmd_convert")

    p = data.add_parser("convert-vpt", help="convert VPT contractor recordings (mp4 + jsonl) to the extracted layout")
    p.add_argument("src", help="a folder of NAME.mp4 + NAME.jsonl recordings (any depth)")
    p.add_argument("dst")
    p.add_argument("--workers", type=int, default=None, help="recordings converted at once (default: min(4, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="convert again recordings whose destination exists")
    p.set_defaults(handler="dreamerv4.data.vpt_convert:cmd_convert")

    p = data.add_parser("shard", help="write episode folders as compressed WebDataset shards (data.path reads either)")
    p.add_argument("src", help="folder of episode folders")
    p.add_argument("dst", help="destination shard folder (index.json + shard-*.tar)")
    p.add_argument("--shard-mb", type=float, default=512.0, help="target shard size in MB")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(handler="dreamerv4.data.shards:cmd_shard")

    p = data.add_parser("tokenize", help="encode an episode folder into a latent dataset with a frozen tokenizer")
    p.add_argument("--checkpoint", required=True, help="tokenizer checkpoint.pt")
    p.add_argument("--data", required=True, help="episode folder")
    p.add_argument("--out", required=True, help="destination latent folder")
    p.add_argument("--overwrite", action="store_true", help="replace latent episodes that exist in --out")
    p.add_argument("--batch-frames", type=int, default=256, help="frames encoded per forward pass")
    p.add_argument("--context", type=int, default=None,
                   help="frames per causal encoding chunk (default: the tokenizer's training seq_len)")
    p.set_defaults(handler="dreamerv4.training.tokenize:cmd_tokenize")

    train = groups.add_parser("train", help="train one stage").add_subparsers(
        dest="train_command", required=True, metavar="STAGE"
    )
    p = train.add_parser("tokenizer", help="masked-autoencoding causal tokenizer (Phase 1A)")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(handler="dreamerv4.training.tokenizer:cmd_train")

    p = train.add_parser("dynamics", help="shortcut-forcing world model on tokenizer latents (Phase 1B)")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(handler="dreamerv4.training.dynamics:cmd_train")

    p = train.add_parser("agent", help="agent tokens + policy/reward/value heads: behaviour cloning (Phase 2)")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(handler="dreamerv4.training.agent:cmd_train")

    p = train.add_parser("imagine", help="reinforcement learning in imagination: PMPO + TD(lambda) (Phase 3)")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(handler="dreamerv4.training.imagine:cmd_train")

    evals = groups.add_parser("eval", help="evaluate a trained stage").add_subparsers(
        dest="eval_command", required=True, metavar="STAGE"
    )
    p = evals.add_parser("tokenizer", help="PSNR/SSIM/LPIPS and object retention of reconstructions")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="episode folder")
    p.add_argument("--split", default="val", choices=["train", "val", "all"],
                   help="which episodes of --data (use `all` for a held-out folder recorded with another seed)")
    p.add_argument("--fit-data", default=None,
                   help="folder whose training split fits the cell classifier (default: the run's data.path)")
    p.add_argument("--out", default=None, help="JSON report path (default: next to the checkpoint)")
    p.add_argument("--max-frames", type=int, default=2048)
    p.set_defaults(handler="dreamerv4.evaluation.tokenizer:cmd_eval")

    p = evals.add_parser("dynamics", help="PSNR and object retention of imagined frames vs baselines")
    p.add_argument("--checkpoint", required=True, help="dynamics checkpoint.pt")
    p.add_argument("--data", required=True, help="held-out episode folder (frames; encoded on the fly)")
    p.add_argument("--out", default=None, help="JSON report path (default: next to the checkpoint)")
    p.add_argument("--context", type=int, default=8, help="real frames before the 15 imagined ones")
    p.add_argument("--windows", type=int, default=64, help="held-out windows (spread evenly over the episodes)")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the one the run trained with)")
    p.add_argument("--fit-data", default=None, help="training episodes for the cell classifier (default: data.path)")
    p.add_argument("--steps", type=int, default=None, help="shortcut steps K per frame (default: the model's, 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the generation")
    p.set_defaults(handler="dreamerv4.evaluation.dynamics:cmd_eval")

    p = evals.add_parser("agent", help="action log-likelihood/accuracy and reward prediction on held-out episodes")
    p.add_argument("--checkpoint", required=True, help="agent checkpoint.pt")
    p.add_argument("--data", required=True, help="held-out episode folder, or a latent folder from `data tokenize`")
    p.add_argument("--out", default=None, help="JSON report path (default: eval.json next to the checkpoint)")
    p.set_defaults(handler="dreamerv4.evaluation.agent:cmd_eval")

    p = evals.add_parser("crafter", help="play the real Crafter game with a trained policy")
    p.add_argument("--checkpoint", required=True, help="agent or imagination checkpoint.pt, or `random`")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=100000, help="first environment seed (episode i uses seed + i)")
    p.add_argument("--out", default=None,
                   help="JSON report path (default: <run>/eval/crafter_<bc|imagine>.json; crafter_random.json for random)")
    p.add_argument("--max-steps", type=int, default=10000, help="episode time limit (Crafter's default: 10000)")
    p.add_argument("--max-context", type=int, default=None,
                   help="world-model context cap in frames (default: the agent's training seq_len)")
    p.add_argument("--greedy", action="store_true", help="take the policy's most likely action instead of sampling")
    p.add_argument("--batch", type=int, default=32, help="episodes played at once in lockstep (same numbers, faster)")
    p.set_defaults(handler="dreamerv4.evaluation.crafter:cmd_eval")

    p = evals.add_parser("compare", help="two `eval crafter` reports on the same worlds, paired world by world")
    p.add_argument("a", help="eval crafter JSON of the policy to test (e.g. crafter_imagine.json)")
    p.add_argument("b", help="eval crafter JSON of its baseline (e.g. crafter_bc.json)")
    p.add_argument("--json", default=None, help="also write the comparison here")
    p.set_defaults(handler="dreamerv4.evaluation.crafter:cmd_compare")

    p = evals.add_parser("imagination", help="the same actions from the same real states in the world model and the "
                                             "real game: imagined vs real reward, unlocks, deaths, drift")
    p.add_argument("--checkpoint", required=True, help="agent or imagination checkpoint.pt")
    p.add_argument("--data", required=True, help="held-out Crafter episodes recorded by `dreamerv4 data crafter`")
    p.add_argument("--starts", type=int, default=64, help="start states (recorded steps, replayed in the game)")
    p.add_argument("--horizon", type=int, default=15, help="imagined (and real) steps from each start")
    p.add_argument("--context", type=int, default=None, help="real frames before each start (default: 4)")
    p.add_argument("--sampling-steps", type=int, default=None, help="shortcut steps K per frame (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the start states and the policy's draws")
    p.add_argument("--reward", default="auto", choices=("auto", "head", "unlocks"),
                   help="imagined reward as imagine.reward (auto: the checkpoint's own imagine.reward)")
    p.add_argument("--out", default=None, help="JSON report path (default: <run>/eval/imagination_<bc|imagine>.json)")
    p.set_defaults(handler="dreamerv4.evaluation.imagination:cmd_eval")

    p = groups.add_parser("play", help="a local web page: play in the real game, the dream, side by side, or watch the agent")
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="a `dreamerv4 run` folder (dynamics/, tokenizer/, and agent/ or imagine/ for agent mode)")
    p.add_argument("--checkpoint", default=None,
                   help="instead of --run: a dynamics checkpoint, or an agent/imagine checkpoint (its world model dreams)")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the run's / the checkpoint's own)")
    p.add_argument("--policy", default="auto", choices=["auto", "bc", "imagine"],
                   help="agent of --run: imagine/ (RL in imagination), agent/ (behaviour cloning), auto: imagine if present")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL is printed)")
    p.add_argument("--steps", type=int, default=None,
                   help="K shortcut steps per dream frame at start (default: the model's; the page can change it)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="model arithmetic (bf16: autocast)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default; 1 is fastest at batch 1, benchmarks/play_speed.py)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="also load checkpoints whose training stopped before it finished")
    p.add_argument("--open", action="store_true", help="open the page in the default browser (off by default)")
    p.set_defaults(handler="dreamerv4.play.server:cmd_play")

    info = groups.add_parser("info", help="inspect configs and models").add_subparsers(
        dest="info_command", required=True, metavar="WHAT"
    )
    p = info.add_parser("params", help="parameter counts of the configured models")
    _config_args(p)
    p.set_defaults(handler="dreamerv4.info:cmd_params")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = args.handler.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
