"""``radit train-lm`` (stage 1, RA-IT) and ``radit train-retriever`` (stage 2, R-IT with LSR).

    radit train-lm --train T.jsonl --index DIR --out OUT [--lm NAME] [--k 3] [--max-steps 100] ...
    radit train-retriever --train T.jsonl --index DIR --out OUT [--lm NAME] [--k 10] ...

Every option can also come from ``--config run.yaml`` (or ``.toml``); flags override the file. Each run
writes ``OUT/radit_config.yaml`` (the resolved configuration), ``OUT/metrics.jsonl`` and checkpoints;
``--resume`` continues the last checkpoint. Distributed: ``torchrun --nproc_per_node N $(which radit)
train-lm ...`` (DDP; ``--fsdp`` shards the LM).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from radit_fast.config.fields import add_arguments
from radit_fast.config.stages import RaItConfig, RetrieverConfig, config_from_args

_EPILOG = ("Options may also be set in --config FILE (YAML or TOML; keys are the option names with _ or -, "
           "optionally under a [train_lm] / [train_retriever] section); command-line flags win.")


def _common(p: argparse.ArgumentParser, cls: type) -> None:
    p.add_argument("--config", type=Path, help="YAML or TOML file with any of the options below")
    add_arguments(p, cls)  # every option of the stage, --train/--index/--out/--lm first


def register(subparsers: argparse._SubParsersAction) -> None:
    lm = subparsers.add_parser(
        "train-lm", help="stage 1: retrieval-augmented instruction tuning of the LM (RA-IT)", epilog=_EPILOG,
        description="Fine-tune the LM on 'Background: chunk / Q: x / A: y' instances, one per retrieved "
                    "chunk, with the loss on the answer tokens only (each answer followed by EOS unless "
                    "--no-append-eos). OUT is a save_pretrained folder.")
    _common(lm, RaItConfig)
    lm.set_defaults(func=_train_lm)

    r = subparsers.add_parser(
        "train-retriever", help="stage 2: LM-supervised retrieval fine-tuning of the query encoder (R-IT)",
        epilog=_EPILOG,
        description="Score the top-k chunks of each example with the frozen LM, and distil the LM's preference "
                    "into the query encoder (LSR). OUT is a query-encoder folder for --query-encoder.")
    _common(r, RetrieverConfig)
    r.set_defaults(func=_train_retriever)


def _check_models(cfg: object, query_encoder: bool = False) -> None:
    """The model-kind checks every command runs on its references before any work (configs only)."""
    from radit_fast.pipeline.checks import check_encoder, check_lm_reference

    cfg.validate()
    check_lm_reference(cfg.lm, "--lm")
    if query_encoder and getattr(cfg, "query_encoder", None) is not None:
        check_encoder(cfg.query_encoder, "--query-encoder")


def _train_lm(args: argparse.Namespace) -> int:
    from radit_fast.training import train_lm

    cfg = config_from_args(RaItConfig, args)
    _check_models(cfg)
    out = train_lm(cfg)
    _done(out)
    return 0


def _train_retriever(args: argparse.Namespace) -> int:
    from radit_fast.training import train_retriever

    cfg = config_from_args(RetrieverConfig, args)
    _check_models(cfg, query_encoder=True)
    out = train_retriever(cfg)
    _done(out)
    return 0


def _done(out: Path) -> None:
    import logging
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger("radit_fast.cli.train").info("wrote %s", out)
