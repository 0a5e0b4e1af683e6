"""The `sbert-sae` command line: `train`, `embed`, `label`, `families`, `push`, `info`, ...

Every expected failure prints one line (`sbert-sae: error: ...`) and exits non-zero;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .errors import InputError, ModelLoadError, SbertSaeError

EXIT_USAGE = 2
EXIT_ERROR = 1


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like the package's own (the usage is for --help)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the option a user types for it (its first long spelling: --k, --cuda-graphs)."""
    return {
        action.dest: next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
        for action in parser._actions
        if action.option_strings
    }


@contextlib.contextmanager
def _naming_options(args, fields: dict[str, str]):
    """Re-raise the package's errors raised inside naming the options the user typed, not the
    settings' fields: `fields` maps a field to the dest of the option it was given from
    ("lr must be > 0, got 0.0" -> "--lr must be > 0, got 0.0"). The Python API's own errors
    keep naming the fields, which is what its callers wrote."""
    flags = {field: args.option_flags[dest] for field, dest in fields.items() if dest in args.option_flags}
    try:
        yield
    except SbertSaeError as err:
        if not flags:
            raise
        # A field's name alone, not inside a longer name ("k" in "k_aux"), an option ("--k")
        # or a quoted value ('lr' in "unknown trackers ['lr']").
        names = "|".join(re.escape(field) for field in sorted(flags, key=len, reverse=True))
        message = re.sub(rf"(?<![\w'\"-])({names})(?![\w'\"-])", lambda m: flags[m.group(1)], str(err))
        if message == str(err):
            raise
        raise type(err)(message) from err


def _settings(cls, args, renamed: dict[str, str] | None = None, check=None, **given):
    """A settings dataclass (`cls`) built from the command's options and checked (its
    `validate()`, then `check(settings)`), refusing a bad value by the option's name.

    A field takes the value of the option whose dest is its name, or of the one `renamed`
    names for it (`ngram_range` <- `--ngram`); `given` sets fields outright (their option,
    if `renamed` names one, is still the one errors name)."""
    fields = {f.name: f.name for f in dataclasses.fields(cls) if f.name in args.option_flags}
    fields.update(renamed or {})
    values = {field: getattr(args, dest) for field, dest in fields.items() if field not in given}
    with _naming_options(args, fields):
        settings = cls(**values, **given)
        if hasattr(settings, "validate"):
            settings.validate()
        if check is not None:
            check(settings)
    return settings


@contextlib.contextmanager
def _naming_resumed_settings(args, sae_renamed: dict[str, str] | None = None):
    """Re-raise a refused --resume (the run in --out was made with other settings) naming
    the options the user typed, not the keys the run records: "--seed 0 -> 4", not
    "training_args.seed: 0 -> 4". `sae_renamed`: SAE fields given by an option of another
    dest (sweep's n_latents <- --n)."""
    from .errors import SettingsChangedError
    from .pipeline import SaeArguments
    from .trainer import TrainingArguments

    try:
        yield
    except SettingsChangedError as err:
        flags = args.option_flags
        sae_fields = {f.name: f.name for f in dataclasses.fields(SaeArguments)}
        sae_fields.update(sae_renamed or {})
        sae_fields.update(base_model="model", base_model_revision="model_revision")
        names = {f"training_args.{f.name}": flags[f.name] for f in dataclasses.fields(TrainingArguments) if f.name in flags}
        names.update({f"config.{field}": flags[dest] for field, dest in sae_fields.items() if dest in flags})
        names["data"] = "the training texts (of the dataset, --max-rows, --heldout-fraction and --seed)"
        if "heldout_fraction" in flags:
            names["data.heldout_fraction"] = flags["heldout_fraction"]
        # Settings left to their default follow others (k_aux is 2k, dead_threshold one epoch's
        # texts): a change of theirs is the other change's, not an option to pass again.
        for field, derived in (("k_aux", "2k"), ("dead_threshold", "one epoch")):
            key = f"config.{field}"
            if key in names and getattr(args, field, None) is None:
                names[key] += f" (not given: {derived})"
        raise err.naming(names) from err


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:  # else the explorer's server stopped with "OverflowError: bind(): port must be 0-65535" (exit 1)
        raise argparse.ArgumentTypeError(f"expected a port number in 1..65535, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {part!r} in {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value} in {text!r}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _number_in(interval: str, inside):
    """An argparse type: a float for which `inside` holds, else an error naming `interval`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not inside(value):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    return parse


_fraction = _number_in("[0, 1)", lambda value: 0 <= value < 1)
_open_fraction = _number_in("(0, 1)", lambda value: 0 < value < 1)


def _ngram_range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        value = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH word counts such as 1-3, got {text!r}") from None
    if not 1 <= value[0] <= value[1] <= 6:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH <= 6, got {text!r}")
    return value


def _add_data_arguments(p: argparse.ArgumentParser, with_model: bool = True, dataset_help: str | None = None) -> None:
    from .base_model import DEFAULT_MODEL

    g = p.add_argument_group("data")
    if dataset_help is None:
        g.add_argument("--dataset", required=True, nargs="+", help="Hub id, save_to_disk folder, data folder, or parquet/jsonl/csv/txt file(s)")
    else:
        g.add_argument("--dataset", default=None, nargs="+", help=dataset_help)
    if with_model:
        g.add_argument("--text-column", default="text", help="column holding the texts (default: text); a struct's field as meta.body")
    else:
        # label / families / search read an SAE's run: its texts are in the column it was trained
        # on (label used "text" whatever the run's, and so labelled another column, or refused).
        g.add_argument("--text-column", default=None, help="column holding the texts (default: the one the SAE's run was trained on, else text)")
    g.add_argument("--config-name", default=None, help="configuration (subset) of a Hub dataset")
    g.add_argument("--split", default="train", help="split to use (default: train)")
    g.add_argument("--dataset-revision", default=None, help="revision of a Hub dataset")
    # label / families / search given the run's own dataset again read it as the run did.
    run_default = "" if with_model else " (default: the run's, when --dataset is the run's dataset)"
    g.add_argument("--json-field", default=None, metavar="KEY", help=f'key under which JSON files that are one object each hold their records, e.g. data for {{"version": ..., "data": [...]}}; a dotted path reaches records nested deeper, going through every list on the way, e.g. data.paragraphs for SQuAD (each article\'s title comes along as column data.title){run_default}')
    g.add_argument("--max-rows", type=_positive_int, default=None, help="use only the first N rows")
    g.add_argument("--strict-text", action="store_true", help="refuse rows whose text is missing, not a string or empty (default: skip and count them)")
    g = p.add_argument_group("embedding")
    if with_model:
        g.add_argument("--model", default=DEFAULT_MODEL, help=f"sentence-transformers model, Hub id or folder (default: {DEFAULT_MODEL})")
        g.add_argument("--model-revision", default=None, help="revision of the model on the Hub")
        g.add_argument("--prompt-name", default=None, help="prepend the model's prompt of this name (e.g. query, passage) to every text (default: the model's default prompt, if it has one)")
        g.add_argument("--prompt", default=None, help="prepend this text to every text, e.g. 'search_document: ' ('' for none, overriding the model's default prompt)")
        g.add_argument("--truncate-dim", type=_positive_int, default=None, help="keep the first N dimensions of each embedding (Matryoshka models); the SAE reads N (default: the model's own setting)")
    g.add_argument("--embed-batch-size", type=_positive_int, default=None, help="most texts per forward pass when embedding; a batch also keeps within 65536 padded tokens on a CUDA GPU, 2048 otherwise (default: as many as that allows, up to 1024)")
    g.add_argument("--embed-precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto", help="embedding precision (default: fp16 on a CUDA GPU, else fp32)")
    g.add_argument("--cache-dir", default=None, help="embedding cache (default: $SBERT_SAE_CACHE, else $XDG_CACHE_HOME/sbert-sae, else ~/.cache/sbert-sae)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")


def _add_query_arguments(p: argparse.ArgumentParser, whose: str = "the") -> None:
    g = p.add_argument_group(
        "query embedding",
        f"how {whose} search query is embedded; default: with the base model's 'query' prompt where it has one and the "
        "corpus was embedded as documents (with its document/passage/corpus prompt), as sentence-transformers' "
        "encode_query does; else as the corpus was",
    )
    g = g.add_mutually_exclusive_group()
    g.add_argument("--query-prompt-name", default=None, metavar="NAME", help="embed the query with the model's prompt of this name (e.g. query)")
    g.add_argument("--query-prompt", default=None, metavar="TEXT", help="prepend this text to the query ('' for none)")
    g.add_argument("--query-like-corpus", action="store_true", help="embed the query exactly as the corpus was (its prompt, the SAE's recorded settings)")


def _query_arguments(args) -> dict:
    """The query embedding options as `SteerableIndex` takes them."""
    return {"query_prompt_name": args.query_prompt_name, "query_prompt": args.query_prompt, "query_like_corpus": args.query_like_corpus}


def _add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The SAE's loss and the training settings `train` and `sweep` share."""
    from .pipeline import SaeArguments
    from .trainer import LR_SCHEDULES, MIXED_PRECISION, TrainingArguments

    defaults, sae_defaults = TrainingArguments(), SaeArguments()
    g = p.add_argument_group("SAE loss")
    g.add_argument("--k-aux", type=_positive_int, default=None, help="dead features in the AuxK loss (default: 2k)")
    g.add_argument("--auxk-coef", type=float, default=sae_defaults.auxk_coef, help="weight of the AuxK loss (default: 1/32)")
    g.add_argument("--dead-threshold", type=_positive_int, default=None, help="samples without firing before a feature counts as dead (default: one epoch)")
    g.add_argument("--normalize", choices=("l2", "none"), default=sae_defaults.normalize, help=f"rescale inputs to unit length (default: {sae_defaults.normalize})")
    g.add_argument("--encoder-init-scale", type=float, default=sae_defaults.encoder_init_scale, help=f"norm of the encoder's rows at initialisation (default: {sae_defaults.encoder_init_scale:g})")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help=f"passes over the training texts (default: {defaults.epochs})")
    g.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size, help=f"global batch size (default: {defaults.batch_size})")
    g.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default: {defaults.lr})")
    g.add_argument("--decoder-lr-scale", type=float, default=defaults.decoder_lr_scale, help=f"the decoder's learning rate as a multiple of --lr (default: {defaults.decoder_lr_scale:g})")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule, help=f"decay after warm-up (default: {defaults.lr_schedule})")
    g.add_argument("--warmup-fraction", type=_fraction, default=defaults.warmup_fraction, help=f"share of steps warming up (default: {defaults.warmup_fraction})")
    g.add_argument("--decay-fraction", type=_fraction, default=defaults.decay_fraction, help=f"share of steps of the wsd schedule's final decay (default: {defaults.decay_fraction})")
    g.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help=f"gradient norm clip, 0 disables (default: {defaults.grad_clip})")
    g.add_argument("--heldout-fraction", type=_fraction, default=0.05, help="share of texts held out for the metrics (default: 0.05)")
    g.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights, split and data order (default: 0)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=defaults.mixed_precision, help="default: bf16 on a CUDA GPU that has it, else fp32")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=defaults.cuda_graphs, help="on one GPU, replay each step from a captured CUDA graph (default: on)")
    g.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help=f"steps between checkpoints, 0 for none (default: {defaults.checkpoint_every})")
    g.add_argument("--checkpoint-min-seconds", type=float, default=defaults.checkpoint_min_seconds, help=f"skip a checkpoint when the last is younger than this, 0 for never (default: {defaults.checkpoint_min_seconds:g})")
    g.add_argument("--log-every", type=_positive_int, default=defaults.log_every, help=f"steps between log records (default: {defaults.log_every})")
    g.add_argument("--report-to", default=defaults.report_to, help="trackers: auto (tensorboard/trackio if installed), none, or a comma list")


def build_parser() -> argparse.ArgumentParser:
    # --debug and --quiet are accepted before or after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars, warnings only")
    parser = _OneLineErrorParser(
        prog="sbert-sae", description="Sparse autoencoders on sentence embeddings, with features named without an LLM.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", parents=[common], help="embed a dataset (cached) and train a top-k SAE on it")
    _add_data_arguments(p)
    g = p.add_argument_group("domains")
    g.add_argument("--domain-column", default=None, help="column naming each text's knowledge domain")
    g.add_argument("--domain", default=None, help="train on this domain only")
    g.add_argument("--per-domain", action="store_true", help="train one SAE per domain into sub-folders, plus a comparison table")
    g = p.add_argument_group("SAE")
    g.add_argument("--n-latents", type=_positive_int, default=6144, help="number of features (default: 6144)")
    g.add_argument("-k", "--k", type=_positive_int, default=32, help="active features per text (default: 32)")
    _add_training_arguments(p)
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="publish the trained SAE (and its card) to this Hub model repo; with --per-domain, each domain's SAE to REPO_ID-<domain slug> (its sub-folder's name), even when there is one domain")
    p.add_argument("--base-model-id", metavar="ORG/NAME", default=None, help="with --push-to-hub: the Hub id the published SAE names as its base model, needed when --model is a local folder (the run folder keeps the folder)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its last checkpoint")

    p = sub.add_parser("sweep", parents=[common], help="train a grid of SAE sizes and sparsities on one cached embedding set; fit FVU power laws in n and compute")
    _add_data_arguments(p)
    g = p.add_argument_group("grid")
    g.add_argument("--n", dest="n_grid", type=_int_list, required=True, metavar="N1,N2,...", help="numbers of features, e.g. 1536,3072,6144,12288")
    g.add_argument("--k", dest="k_grid", type=_int_list, required=True, metavar="K1,K2,...", help="active features per text, e.g. 16,32,64")
    _add_training_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="folder for the grid's runs (n<N>-k<K>/), sweep.json, sweep.md and scaling.png")
    g.add_argument("--overwrite", action="store_true", help="retrain grid points already trained in --out")
    g.add_argument("--resume", action="store_true", help="continue interrupted grid points from their last checkpoint")

    p = sub.add_parser("embed", parents=[common], help="embed a dataset's text column into the cache and print where it is")
    _add_data_arguments(p)

    from .labels import LabelArguments

    label_defaults = LabelArguments()
    p = sub.add_parser("label", parents=[common], help="name every feature with KeyBERT (no LLM) and score each name on held-out texts")
    p.add_argument("sae", help="SAE folder (feature_labels.json is written there)")
    _add_data_arguments(p, with_model=False, dataset_help="corpus to label on (default: the texts the SAE was trained on, a domain's SAE's own domain's; other data options apply only with it, but --text-column)")
    g = p.add_argument_group("labelling")
    g.add_argument("--top-texts", type=_positive_int, default=label_defaults.top_texts, help=f"strongest firing texts per feature (default: {label_defaults.top_texts})")
    g.add_argument("--quantile-texts", type=int, default=label_defaults.quantile_texts, help=f"more firing texts across activation quantiles (default: {label_defaults.quantile_texts})")
    g.add_argument("--negatives", type=_positive_int, default=label_defaults.negatives, help=f"non-firing texts each candidate label is judged on, half the hardest (default: {label_defaults.negatives})")
    g.add_argument("--ngram", type=_ngram_range, default=label_defaults.ngram_range, help="candidate n-gram lengths in words, e.g. 1-3 (default: 1-3); runs of scripts without spaces (Chinese, Japanese, Thai, ...) give n-grams of characters or clusters instead")
    g.add_argument("--min-df", type=_positive_int, default=label_defaults.min_df, help=f"corpus texts an n-gram must occur in to be a candidate (default: {label_defaults.min_df})")
    g.add_argument("--candidates", type=_positive_int, default=label_defaults.candidates, help=f"lexical candidates per feature given to KeyBERT (default: {label_defaults.candidates})")
    g.add_argument("--keywords", type=_positive_int, default=label_defaults.keywords, help=f"keywords KeyBERT keeps per feature, the shortlist labels are made from (default: {label_defaults.keywords})")
    g.add_argument("--max-label-keywords", type=_positive_int, default=label_defaults.max_label_keywords, help=f"keywords in a label at most (default: {label_defaults.max_label_keywords})")
    g.add_argument("--label-heldout-fraction", type=_open_fraction, default=label_defaults.heldout_fraction, help=f"texts kept out of labelling to score labels on (default: {label_defaults.heldout_fraction})")
    g.add_argument("--block-size", type=_positive_int, default=label_defaults.block_size, help=f"features labelled between two saves of the work so far, which a killed run resumes from (default: {label_defaults.block_size})")
    g.add_argument("--seed", type=int, default=label_defaults.seed, help=f"seed of the held-out split labels are scored on and of the texts sampled as negatives (default: {label_defaults.seed})")

    from .families import FamilyArguments

    fam_defaults = FamilyArguments()
    p = sub.add_parser("families", parents=[common], help="group features into families (co-occurrence spanning tree, O'Neill et al. 2024); write families.json and plots")
    p.add_argument("sae", help="SAE run folder (families.json, families_cooccurrence.png and family_graph.png are written there)")
    _add_data_arguments(p, with_model=False, dataset_help="corpus to count co-occurrences on (default: the texts the SAE was trained on, a domain's SAE's own domain's; other data options apply only with it)")
    g = p.add_argument_group("families")
    g.add_argument("--threshold", type=float, default=fam_defaults.threshold, help=f"smallest C_norm = C[i,j]/(C[i,i]+1) that makes an edge (default: {fam_defaults.threshold})")
    g.add_argument("--min-out-degree", type=_positive_int, default=fam_defaults.min_out_degree, help=f"children in the tree a root needs to head a family (default: {fam_defaults.min_out_degree})")
    g.add_argument("--min-children", type=_positive_int, default=fam_defaults.min_children, help=f"members besides the parent a family needs to be kept (default: {fam_defaults.min_children})")
    g.add_argument("--removal-rounds", type=int, default=fam_defaults.removal_rounds, help=f"times the roots are removed and the tree rebuilt (default: {fam_defaults.removal_rounds})")
    g.add_argument("--max-jaccard", type=float, default=fam_defaults.max_jaccard, help=f"of two families whose children overlap more, keep the larger (default: {fam_defaults.max_jaccard})")
    g.add_argument("--max-density", type=float, default=fam_defaults.max_density, help=f"leave out features firing on more than this share of texts (default: {fam_defaults.max_density})")
    g.add_argument("--no-descend", action="store_true", help="only roots head families, not qualifying children inside them")
    g.add_argument("--permutations", type=_positive_int, default=fam_defaults.permutations, help=f"random permutations the block ratio is compared with (default: {fam_defaults.permutations})")
    g.add_argument("--plot-family", type=int, default=None, metavar="FEATURE", help="draw the family this feature heads (default: a mid-sized family whose members fire most with their tree parents)")
    g.add_argument("--top", type=_positive_int, default=10, help="families to print (default: 10)")
    g.add_argument("--seed", type=int, default=fam_defaults.seed, help=f"seed of the permutations the block ratio is compared with (default: {fam_defaults.seed})")

    p = sub.add_parser("push", parents=[common], help="publish an SAE folder (weights, config, labels, metrics, plots, model card) to a Hub model repo")
    p.add_argument("sae", help="SAE folder (a trained run)")
    p.add_argument("repo_id", help="Hub model repo, e.g. org/minilm-wiki-sae (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--license", dest="license_name", default=None, help="license id for the model card, e.g. apache-2.0")
    p.add_argument("--commit-message", default="Upload sbert-sae SAE")
    p.add_argument("--base-model-id", metavar="ORG/NAME", default=None, help="the Hub id the published config and card name as the base model (default: the run's own, which must then be a Hub id or a Hub cache or packaged copy of one); the SAE folder keeps its own")
    p.add_argument("--format", choices=("sbert-sae", "sentence-transformers"), default="sbert-sae", help="sentence-transformers: publish a SparseEncoder (base model + this SAE's encoder) that SparseEncoder(REPO_ID) loads without sbert-sae; use its own repo")
    p.add_argument("--activations", action="store_true", help="also push the corpus' sparse activations as a dataset repo")
    p.add_argument("--activations-repo", default=None, help="dataset repo for them (default: REPO_ID-activations)")
    p.add_argument("--dataset", default=None, nargs="+", help="corpus to encode for --activations, as train's --dataset takes it (default: the texts the SAE was trained on, a domain's SAE's own domain's)")
    p.add_argument("--text-column", default=None, help="its text column (default: the training run's; text with --dataset)")

    p = sub.add_parser("release", parents=[common], help="train, label and publish the SAE a recipe describes (hub/recipes/*.yaml), then register it")
    p.add_argument("recipe", help="a recipe YAML file")
    p.add_argument("--out", required=True, help="folder for the run")
    p.add_argument("--no-push", action="store_true", help="train and label only")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    # The refusal of an --out that holds a run says "pass --overwrite ... or --resume": both exist here as in train.
    p.add_argument("--resume", action="store_true", help="continue the interrupted training in --out from its last checkpoint, then label and publish")

    p = sub.add_parser("compare", parents=[common], help="match two SAEs' features one to one by decoder cosine (e.g. two domains); write comparison.json and a histogram")
    p.add_argument("run_a", metavar="RUN_A", help="SAE folder A")
    p.add_argument("run_b", metavar="RUN_B", help="SAE folder B (same base model and d_in)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_A/compare-<name of RUN_B>)")
    p.add_argument("--min-cosine", type=float, default=0.7, help="cosine a matched pair needs to count as shared (default: 0.7)")
    p.add_argument("--top", type=_positive_int, default=20, help="shared pairs to print (default: 20)")

    p = sub.add_parser("search", parents=[common], help="semantic search over a corpus with a query whose SAE features are raised, lowered or clamped")
    p.add_argument("sae", help="SAE run folder (searches the corpus it was trained on) or Hub repo id (needs --dataset)")
    p.add_argument("query", help="the query text")
    _add_data_arguments(p, with_model=False, dataset_help="corpus to search (default: the texts the SAE was trained on, a domain's SAE's own domain's; other data options apply only with it)")
    g = p.add_argument_group("steering")
    target = "a feature id, 'family:ID' (the family that feature heads), or a label query ('features about X'); append '=S' for its own strength"
    g.add_argument("--up", action="append", default=[], metavar="FEATURE[=S]", help=f"raise a feature: {target} (repeatable)")
    g.add_argument("--down", action="append", default=[], metavar="FEATURE[=S]", help="lower a feature, same forms (repeatable)")
    g.add_argument("--clamp", action="append", default=[], metavar="FEATURE=VALUE", help="set a feature's activation to VALUE (repeatable)")
    g.add_argument("--strength", type=float, default=0.5, help="strength of --up/--down targets without their own, in units of the query's length (default: 0.5)")
    g.add_argument("--method", choices=("add", "clamp"), default="add", help="add: add/subtract the decoder directions (the paper's); clamp: set the query's activations and decode the change (default: add)")
    g.add_argument("--top", type=_positive_int, default=10, help="hits to show (default: 10)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_query_arguments(p)

    sub.add_parser("list", parents=[common], help="print the registry of released SAEs (short name, repo, metrics)")

    p = sub.add_parser("info", parents=[common], help="print the config and metrics of a trained SAE")
    p.add_argument("sae", help="SAE folder or Hub repo id")

    p = sub.add_parser("explore", parents=[common], help="open the explorer web app of an SAE: features, texts, steered search, overview")
    p.add_argument("sae", help="SAE folder, Hub repo id or registry short name")
    p.add_argument("--dataset", default=None, help="corpus to show texts from (default: the texts the SAE was trained on, a domain's SAE's own domain's, else its published activations)")
    p.add_argument("--text-column", default=None, help="the corpus' text column (default: the training run's, else text)")
    p.add_argument("--revision", default=None, help="revision of a Hub repo")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=None, help="port (default: 7860, or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: $SBERT_SAE_CACHE, else $XDG_CACHE_HOME/sbert-sae, else ~/.cache/sbert-sae)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    _add_query_arguments(p, "the Search tab's")
    p = sub.add_parser(
        "cache",
        parents=[common],
        help="list the embedding caches, label vectors and JSON records sbert-sae keeps, or remove some",
        description="What sbert-sae keeps between runs: embedding caches (with the SAE codes kept beside them) and label vectors "
        "under $SBERT_SAE_CACHE (default ~/.cache/sbert-sae), and the records a dotted --json-field found, under "
        "$HF_DATASETS_CACHE/sbert_sae_json_records. Anything removed is made again by the next run that needs it.",
    )
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    cache_sub.required = True
    cache_dir_help = "embedding cache (default: $SBERT_SAE_CACHE, else $XDG_CACHE_HOME/sbert-sae, else ~/.cache/sbert-sae)"
    q = cache_sub.add_parser("list", aliases=["ls", "scan"], parents=[common], help="one line per entry: what it holds, status, size, last use, its SAE codes; totals")
    q.add_argument("--json", action="store_true", help="print the entries as JSON, for scripts")
    q.add_argument("--cache-dir", default=None, help=cache_dir_help)
    q = cache_sub.add_parser(
        "remove",
        aliases=["rm"],
        parents=[common],
        help="remove entries (whole, or only their SAE codes); an entry another process is filling is skipped",
        description="Remove the entries every given selector picks. Each goes whole or not at all: it is renamed aside, then deleted. "
        "An entry another process is filling (it holds the entry's lock) is left in place.",
    )
    q.add_argument("ids", nargs="*", metavar="ID", help="entry ids or unique prefixes of them, as `sbert-sae cache list` prints")
    q.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="entries (or, with --codes, codes files) no run has used for more than DAYS days")
    q.add_argument("--partial", action="store_true", help="entries whose filling was interrupted, or that are damaged (the next run redoes them anyway)")
    q.add_argument("--codes", action="store_true", help="remove only the SAE codes kept inside the selected embedding caches, not the embeddings")
    q.add_argument("--kind", action="append", choices=("embeddings", "json-records", "label-vectors"), default=None, help="only entries of this kind (repeatable)")
    q.add_argument("--all", dest="all_entries", action="store_true", help="every entry (narrowed by the other selectors given)")
    q.add_argument("--dry-run", action="store_true", help="print what would be removed and the space it takes; remove nothing")
    q.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation (needed when not on a terminal)")
    q.add_argument("--cache-dir", default=None, help=cache_dir_help)
    for q in cache_sub.choices.values():
        q.set_defaults(option_flags=_option_flags(q))
    for p in sub.choices.values():
        # What errors about a setting name: the option it came from (see _naming_options).
        p.set_defaults(option_flags=_option_flags(p))
    return parser


def _run_data(sae_folder) -> dict:
    """The `data` entry of the training_args.json of the run in `sae_folder`; {} if none."""
    path = Path(sae_folder) / "training_args.json" if sae_folder else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text()).get("data", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_text_column(sae_folder) -> str | None:
    """The text column the run in `sae_folder` was trained on (its training_args.json), if any."""
    column = _run_data(sae_folder).get("text_column")
    return column if isinstance(column, str) and column else None


def _data_arguments(args):
    from .base_model import DEFAULT_MODEL
    from .pipeline import DataArguments, recorded_model, run_json_field

    text_column = args.text_column
    if text_column is None:
        text_column = _run_text_column(getattr(args, "sae", None)) or "text"
    json_field = args.json_field
    if json_field is None:
        json_field = run_json_field(_run_data(getattr(args, "sae", None)), args.dataset)
    return DataArguments(
        dataset=args.dataset[0] if len(args.dataset) == 1 else args.dataset,
        text_column=text_column,
        config_name=args.config_name,
        split=args.split,
        revision=args.dataset_revision,
        json_field=json_field,
        domain_column=getattr(args, "domain_column", None),
        domain=getattr(args, "domain", None),
        per_domain=getattr(args, "per_domain", False),
        heldout_fraction=getattr(args, "heldout_fraction", 0.05),
        on_bad_text="error" if args.strict_text else "skip",
        max_rows=args.max_rows,
        model=recorded_model(getattr(args, "model", DEFAULT_MODEL)),
        model_revision=getattr(args, "model_revision", None),
        encode_kwargs={
            name: getattr(args, name) for name in ("prompt_name", "prompt", "truncate_dim") if getattr(args, name, None) is not None
        },
        embed_batch_size=args.embed_batch_size,
        embed_precision=args.embed_precision,
        cache_dir=args.cache_dir,
        device=args.device,
    )


def _training_and_sae_arguments(args, **sae_given):
    """The TrainingArguments and SaeArguments of `train`/`sweep`'s options, checked as
    run_training checks them (impossible SAE sizes included), before any text is read."""
    from .configuration_sbert_sae import SparseAutoencoderConfig
    from .pipeline import SaeArguments
    from .trainer import TrainingArguments

    train_args = _settings(TrainingArguments, args, show_progress=not args.quiet)
    # sweep's --n/--k grids give the SAE sizes checked here: the largest n with the smallest k.
    renamed = {"n_latents": "n_grid", "k": "k_grid"} if sae_given else None
    sae_args = _settings(SaeArguments, args, renamed, check=lambda sae: SparseAutoencoderConfig(**dataclasses.asdict(sae), d_in=1), **sae_given)
    return train_args, sae_args


def cmd_train(args) -> int:
    from .pipeline import run_training

    train_args, sae_args = _training_and_sae_arguments(args)
    if args.base_model_id is not None and not args.push_to_hub:
        raise InputError("--base-model-id names the base model of what --push-to-hub publishes: give --push-to-hub REPO_ID too")
    if args.push_to_hub:
        from .hub import published_base_model

        # Before the training: a base model the push would refuse must not cost a whole run first.
        config = {"base_model": args.model, "base_model_revision": args.model_revision}
        args.base_model_id, _ = published_base_model(config, args.base_model_id, where=f"--push-to-hub {args.push_to_hub} refused before training")
    with _naming_resumed_settings(args):
        results = run_training(_data_arguments(args), sae_args, train_args, args.out, overwrite=args.overwrite, resume=args.resume)
    for r in results:
        m = r.metrics
        if not m.get("n_heldout"):
            # --heldout-fraction 0: every held-out figure is NaN; say so and show training's instead.
            print(
                f"[{r.name}] {r.out_dir}: no held-out texts (--heldout-fraction 0): training FVU {m.get('train_fvu', float('nan')):.4f}, "
                f"dead {m['dead_fraction']:.1%}, dense {m['dense_fraction']:.1%} ({m['n_train']} train texts, {m['train_seconds']:.0f}s)"
            )
            continue
        seen = m.get("heldout_seen_in_training")
        # Held-out texts that duplicate training texts flatter the figures printed beside them.
        also = f", {round(seen * m['n_heldout'])} of them also training texts" if isinstance(seen, float) and seen > 0 else ""
        print(
            f"[{r.name}] {r.out_dir}: held-out FVU {m.get('heldout_fvu', float('nan')):.4f}, "
            f"cosine {m.get('heldout_cosine', float('nan')):.4f}, L0 {m.get('heldout_l0', float('nan')):.1f}, "
            f"dead {m['dead_fraction']:.1%}, dense {m['dense_fraction']:.1%}, "
            f"neighbour overlap@10 {m.get('neighbour_overlap_at_10', float('nan')):.3f} "
            f"({m['n_train']} train / {m['n_heldout']} held-out texts{also}, {m['train_seconds']:.0f}s)"
        )
    if results:
        out = Path(args.out)
        where = f"{out}/" if all(r.out_dir == out for r in results) else f"one folder per domain under {out}/"
        print(f"results: {where} (model.safetensors, config.json, metrics.json, density.png, training_args.json)")
        if args.per_domain:  # written for one domain too (with the ones skipped as too small)
            print(f"domain comparison: {out / 'domains.md'}")
    if args.push_to_hub:
        from .hub import push_sae

        for r in results:
            # With --per-domain every domain's repo, even a lone domain's, is named after its folder
            # (distinct per domain; see utils.domain_slugs), as --push-to-hub's help says.
            repo_id = f"{args.push_to_hub}-{r.out_dir.name}" if args.per_domain else args.push_to_hub
            sha = push_sae(r.out_dir, repo_id, base_model_id=args.base_model_id)
            print(f"pushed {r.out_dir} to {repo_id} (commit {sha})")
    return 0


def cmd_label(args) -> int:
    from .labels import LabelArguments
    from .pipeline import run_labelling

    # A wrong value is named (by its option) before anything is looked for.
    label_args = _settings(LabelArguments, args, {"ngram_range": "ngram", "heldout_fraction": "label_heldout_fraction"})
    if not Path(args.sae).is_dir():
        from .modeling_sbert_sae import _names_a_folder

        # The labels are written beside the weights: a Hub repo id was loaded, then failed on
        # its missing local files ('FileNotFoundError: ... model.safetensors').
        repo = not _names_a_folder(args.sae) and not Path(args.sae).exists()
        hint = f" (for a Hub repo, download it first: hf download {args.sae} --local-dir DIR)" if repo else ""
        raise ModelLoadError(f"{args.sae!r} is not a folder here: label writes feature_labels.json into the SAE's folder{hint}")
    from .families import corpus_arguments

    started = time.perf_counter()
    overrides = {"cache_dir": args.cache_dir, "device": args.device, "embed_batch_size": args.embed_batch_size, "text_column": args.text_column}
    data = corpus_arguments(args.sae, _data_arguments(args) if args.dataset else None, **overrides)
    summary = run_labelling(args.sae, data, label_args, show_progress=not args.quiet)
    seconds = time.perf_counter() - started
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"labelled {summary['n_labelled']} of {summary['n_features']} features ({summary['n_dead']} dead, {summary['n_unlabelled']} unlabelled); "
        f"held-out AUROC mean {fmt(summary['label_auroc_mean'])}, median {fmt(summary['label_auroc_median'])}, "
        f"share >= 0.8 {fmt(summary['label_auroc_share_above_0.8'])}; Pearson r mean {fmt(summary['label_pearson_mean'])}; "
        f"unique labels {fmt(summary['distinct_label_share'])}; {seconds:.0f}s"
    )
    print(f"labels: {Path(args.sae) / 'feature_labels.json'}")
    return 0


def cmd_families(args) -> int:
    from .families import COOCCURRENCE_PLOT, FAMILIES_FILE, GRAPH_PLOT, FamilyArguments, corpus_arguments, run_families

    fam_args = _settings(FamilyArguments, args, descend=not args.no_descend)
    started = time.perf_counter()
    overrides = {"cache_dir": args.cache_dir, "device": args.device, "embed_batch_size": args.embed_batch_size}
    data = corpus_arguments(args.sae, _data_arguments(args) if args.dataset else None, **overrides)
    result = run_families(args.sae, data, fam_args, show_progress=not args.quiet, plot_family=args.plot_family)
    seconds = time.perf_counter() - started
    s, out = result.summary, Path(args.sae)
    if not result.families:
        print(
            f"no families found among {s['n_eligible_features']} features over {s['n_texts']} texts: no feature heads "
            f">= {fam_args.min_out_degree} sparser features with C_norm >= {fam_args.threshold} in the spanning tree and "
            f">= {fam_args.min_children} members in all (try a lower --threshold or a larger corpus); {seconds:.0f}s"
        )
        kept = s.get("kept_existing")
        if kept:
            print(f"kept the {kept} families already in {out / FAMILIES_FILE} (and their plots): an empty result does not replace them")
        else:
            print(f"wrote an empty {out / FAMILIES_FILE}")
        return 0
    print(
        f"{s['n_families']} families among {s['n_eligible_features']} features ({s['n_texts']} texts): {s['n_features_in_families']} features in families; "
        f"children per family {s['children_min']}-{s['children_max']}, median {s['children_median']:g}, mean {s['children_mean']:g}; "
        f"found in trees {', '.join(str(n) for n in s['families_per_round'])}"
    )
    ratio = "n/a" if s["block_ratio"] is None else f"{s['block_ratio']:.2f}"
    permuted = "n/a" if s["permuted_block_ratio_mean"] is None else f"{s['permuted_block_ratio_mean']:.2f} ± {s['permuted_block_ratio_std']:.2f} (max {s['permuted_block_ratio_max']:.2f})"
    print(f"block ratio (mean C_norm inside families / outside): {ratio}; with permuted feature ids: {permuted} over {s['n_permutations']} permutations")
    print("largest families:")
    for fam in result.families[: max(0, args.top)]:
        children = "; ".join(label or f"#{c}" for c, label in list(zip(fam.children, fam.labels[1:]))[:4])
        print(f"  #{fam.parent} ({len(fam.children)} children) {fam.label or '(no labels)'}")
        print(f"      children: {children}{'; ...' if len(fam.children) > 4 else ''}")
    print(f"families: {out / FAMILIES_FILE}; plots: {out / COOCCURRENCE_PLOT}, {out / GRAPH_PLOT} (family of #{s['plotted_family']}); {seconds:.0f}s")
    return 0


def cmd_embed(args) -> int:
    from .pipeline import load_and_embed

    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch`: each process embeds its share
        import torch
        from accelerate import PartialState

        # The processes only wait for one another (host-side): without --device each takes
        # its own GPU; with one named, they all embed on it and synchronise through gloo.
        state = PartialState(cpu=args.device is not None or not torch.cuda.is_available())
    _, cache = load_and_embed(_data_arguments(args), accelerator=state, show_progress=not args.quiet)
    if state is not None and not state.is_main_process:
        return 0
    skipped = cache.meta.get("skipped") or {}
    print(f"{cache.embeddings.shape[0]} embeddings of dim {cache.dim} in {cache.path}" + (f" (skipped rows: {skipped})" if skipped else ""))
    return 0


def cmd_info(args) -> int:
    from . import SparseAutoencoder

    sae = SparseAutoencoder.from_pretrained(args.sae)
    print(sae.config.to_json_string(use_diff=True).strip())
    metrics = Path(args.sae) / "metrics.json"
    if metrics.exists():
        data = json.loads(metrics.read_text())
        data.pop("descriptions", None)
        print(json.dumps(data, indent=2))
    return 0


def _disable_library_progress_bars() -> None:
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def cmd_push(args) -> int:
    import dataclasses

    from .hub import publish, push_sparse_encoder, training_data_arguments
    from .pipeline import DataArguments, run_json_field

    if args.format == "sentence-transformers":
        sha = push_sparse_encoder(args.sae, args.repo_id, private=args.private or None, revision=args.revision, base_model_id=args.base_model_id)
        print(f"pushed {args.sae} as a SparseEncoder to {args.repo_id} (commit {sha})")
        print(f'load it with: SparseEncoder("{args.repo_id}")  (sentence-transformers only)')
        return 0

    data = None
    if args.activations and args.dataset:
        dataset = args.dataset[0] if len(args.dataset) == 1 else args.dataset  # several files, as train takes them
        data = DataArguments(dataset=dataset, text_column=args.text_column or "text", json_field=run_json_field(_run_data(args.sae), dataset))
    elif args.activations and args.text_column:
        data = dataclasses.replace(training_data_arguments(args.sae), text_column=args.text_column)
    result = publish(
        args.sae,
        args.repo_id,
        activations=args.activations,
        activations_repo=args.activations_repo,
        data=data,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        license_name=args.license_name,
        show_progress=not args.quiet,
        base_model_id=args.base_model_id,
    )
    if "activations_repo" in result:
        print(f"pushed the corpus' activations to the dataset {result['activations_repo']} (commit {result['activations_sha']})")
    print(f"pushed {args.sae} to {args.repo_id} (commit {result['sha']})")
    print(f'load it with: SparseAutoencoder.from_pretrained("{args.repo_id}")')
    return 0


def cmd_release(args) -> int:
    from .registry import release

    outcome = release(args.recipe, args.out, push=not args.no_push, overwrite=args.overwrite, resume=args.resume, show_progress=not args.quiet)
    m = outcome["metrics"]
    print(f"{outcome['name']}: {outcome['out_dir']} held-out FVU {m.get('heldout_fvu', float('nan')):.4f}, label AUROC {m.get('label_auroc_mean') or float('nan'):.4f}")
    if "sha" in outcome:
        print(f"published to {outcome['repo_id']} (commit {outcome['sha']}) and registered as {outcome['name']!r}")
    return 0


def cmd_compare(args) -> int:
    from .compare import COMPARISON_FILE, COMPARISON_PLOT, run_comparison

    started = time.perf_counter()
    with _naming_options(args, {"min_cosine": "min_cosine"}):
        result, out = run_comparison(args.run_a, args.run_b, args.out, min_cosine=args.min_cosine)
    s = result.summary()
    med, rmed = s["matched_cosine"].get("median", float("nan")), s["random_cosine"].get("median", float("nan"))
    rmax = s["random_cosine"].get("max", float("nan"))
    print(
        f"{s['n_live_a']} live features in A ({s['n_features_a']}), {s['n_live_b']} in B ({s['n_features_b']}); {s['n_matched']} matched one to one ({s['method']}): "
        f"{s['n_shared']} shared at cosine >= {args.min_cosine:g}, {s['n_only_a']} in A only, {s['n_only_b']} in B only"
    )
    print(f"matched cosine median {med:.3f} vs {rmed:.3f} against random unit directions (random max {rmax:.3f}, {s['random_above_min_cosine']} random above {args.min_cosine:g})")
    if result.shared:
        la, lb = result.labels_a, result.labels_b
        print("top shared pairs (A -> B):")
        for i, j, c in result.shared[: max(0, args.top)]:
            print(f"  {c:.3f}  #{i} {la[i] or '(no label)'}  <->  #{j} {lb[j] or '(no label)'}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"comparison: {out / COMPARISON_FILE}; plot: {out / COMPARISON_PLOT}; {time.perf_counter() - started:.0f}s")
    return 0


def _steering_targets(values: list[str], default: float | None, flag: str) -> dict[str, float]:
    targets: dict[str, float] = {}
    for value in values:
        key, sep, strength = value.rpartition("=")
        if not sep:
            key, strength = value, None
        key = key.strip()
        if not key:
            raise InputError(f"{flag} {value!r}: name a feature before '='")
        if strength is None:
            if default is None:
                raise InputError(f"{flag} {value!r}: give the activation to set, e.g. {flag} {key}=0.3")
            if not math.isfinite(default):  # search would name it "up strength for '12'", not the option
                raise InputError(f"--strength must be a finite number, got {default!r}")
            targets[key] = default
            continue
        try:
            targets[key] = float(strength)
        except ValueError:
            raise InputError(f"{flag} {value!r}: {strength!r} is not a number") from None
        if not math.isfinite(targets[key]):
            raise InputError(f"{flag} {value!r}: {strength!r} is not a finite number")
    return targets


def cmd_search(args) -> int:
    from .base_model import AS_CORPUS
    from .modeling_sbert_sae import SparseAutoencoder
    from .search import SteerableIndex

    _disable_library_progress_bars()
    up = _steering_targets(args.up, args.strength, "--up")
    down = _steering_targets(args.down, args.strength, "--down")
    clamp = _steering_targets(args.clamp, None, "--clamp")
    data = _data_arguments(args) if args.dataset else None
    show = not args.quiet and not args.json
    query = _query_arguments(args)
    if Path(args.sae).is_dir() and (Path(args.sae) / "training_args.json").exists():
        index = SteerableIndex.from_run(args.sae, data, device=args.device, show_progress=show, **query)
    else:
        if data is None:
            raise InputError(f"{args.sae} is not a training run folder: pass --dataset, the corpus to search")
        sae = SparseAutoencoder.from_pretrained(args.sae)
        index = SteerableIndex.build(sae, data, device=args.device, show_progress=show, **query)
    encoding = index.query_encoding  # a prompt name the model does not have is refused before any search
    result = index.search(args.query, up=up or None, down=down or None, clamp=clamp or None, k=args.top, method=args.method)
    st = result.steering
    # Labels are printed as texts are: a published feature_labels.json may hold any characters.
    labels = [None if label is None else _terminal_text(label) for label in index.sae.feature_labels]
    if args.json:
        print(json.dumps({
            "query": args.query, "query_prompt": encoding.prompt, "method": st.method, "cosine_to_query": st.cosine, "similarity": index.similarity,
            "up": st.up, "down": st.down, "clamp": st.clamp, "resolved": st.resolved,
            "hits": [{"row": h.row, "score": h.score, "steered": h.steered, "text": h.text} for h in result.hits],
        }, indent=1, ensure_ascii=False))
        return 0
    if encoding.prompt is not None or encoding.reason != AS_CORPUS:
        # A model with prompts: which one the query was embedded with changes every hit.
        shown = f"prompt {_terminal_text(repr(encoding.prompt))}" if encoding.prompt is not None else "no prompt"
        print(f"query embedded with {shown}: {_terminal_text(encoding.reason)}")
    active = index.query_features(args.query, top=6)
    print("query features: " + "; ".join(f"#{f} {labels[f] or '(no label)'} {v:.2f}" for f, v, _ in active))
    # A family steers as one direction, its members' mean, at the strength given: it is shown as
    # one target, not as each member at its share (42 lines of "strength 0.0142857" for 0.6).
    families = {name: ids for name, ids in st.resolved.items() if name.startswith("family:")}
    alone = {f for name, ids in st.resolved.items() if not name.startswith("family:") for f in ids}
    if st.features:
        for role, given, ids in (("up", up, st.up), ("down", down, st.down), ("clamp", clamp, st.clamp)):
            for name, s in given.items():
                if name in families:
                    members = families[name]
                    shown = "; ".join(f"#{f} {labels[f] or '(no label)'}" for f in members[:3]) + ("; ..." if len(members) > 3 else "")
                    print(f"{role:>5} {name} ({len(members)} features, their mean direction: {shown}) {'value' if role == 'clamp' else 'strength'} {s:g}")
            for f, s in ids.items():
                if f in alone or not any(f in members for members in families.values()):
                    print(f"{role:>5} #{f} {labels[f] or '(no label)'} {'value' if role == 'clamp' else 'strength'} {s:g}")
        for name, ids in st.resolved.items():
            if not name.isdigit() and len(ids) == 1 and not name.startswith("family:"):
                print(f"      {name!r} read as #{ids[0]} {labels[ids[0]] or ''}")
        print(f"steered query ({st.method}): cosine {st.cosine:.3f} to the original")
    if index.similarity != "cosine":
        print(f"ranked by {index.similarity}, the base model's similarity")
    width = shutil.get_terminal_size((120, 20)).columns
    for rank, hit in enumerate(result.hits, 1):
        firing = " ".join(f"#{f}" for f, a in hit.steered.items() if a > 0)
        head = f"{rank:>3}. {hit.score:.3f} row {hit.row}" + (f" [fires: {firing}]" if firing else "")
        text = _terminal_text(" ".join((hit.text or "").split()))
        room = max(40, width - len(head) - 2)
        print(f"{head}  {text[:room - 1] + '…' if len(text) > room else text}")
    if st.features:
        for name, members in families.items():
            n = sum(any(hit.steered[f] > 0 for f in members) for hit in result.hits)
            print(f"{name} (any of its {len(members)} features) fires in {n} of {len(result.hits)} hits")
        for f in st.features:
            if f in alone or not any(f in members for members in families.values()):
                n = sum(hit.steered[f] > 0 for hit in result.hits)
                print(f"#{f} fires in {n} of {len(result.hits)} hits")
    return 0


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _terminal_text(text: str) -> str:
    """A corpus text as it may be printed: its control characters (an escape sequence that turns
    the terminal red or clears it, a bell, a NUL) written as escapes (\\x1b) rather than sent."""
    return _CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def cmd_sweep(args) -> int:
    from .sweep import SCALING_PLOT, SWEEP_FILE, SWEEP_TABLE, check_grid, run_sweep

    with _naming_options(args, {"n": "n_grid", "k": "k_grid"}):
        check_grid(args.n_grid, args.k_grid)
    train_args, sae_args = _training_and_sae_arguments(args, n_latents=max(args.n_grid), k=min(args.k_grid))
    started = time.perf_counter()
    out = Path(args.out)
    with _naming_resumed_settings(args, {"n_latents": "n_grid", "k": "k_grid"}):
        result = run_sweep(_data_arguments(args), args.n_grid, args.k_grid, train_args, out, sae_args, overwrite=args.overwrite, resume=args.resume, show_progress=not args.quiet)
    print("     n    k  held-out FVU  train FVU   dead  train FLOPs")
    for r in result.rows:
        print(f"{r['n']:>6} {r['k']:>4}  {r['heldout_fvu']:.4f}        {r['train_fvu']:.4f}     {r['dead_fraction']:5.1%}  {r['train_flops']:.2e}")
    for k, fit in sorted(result.fits_n.items()):
        fc = result.fits_compute.get(k)
        compute = "" if fc is None else f"; against compute: FVU = {fc.a:.3g} * C^-{fc.exponent:.3f} (r2 {fc.r2:.3f})"
        ft = result.fits_train_n.get(k)
        train = "" if ft is None else f"; training FVU ~ n^-{ft.exponent:.3f}"
        print(f"k={k}: held-out FVU = {fit.a:.3g} * n^-{fit.exponent:.3f} (r2 {fit.r2:.3f}, {fit.n_points} sizes){compute}{train}")
    if not result.fits_n:
        print("no power law fitted: give at least two values of --n")
    if result.skipped:
        print(f"already trained, reused: {', '.join(result.skipped)}")
    print(f"sweep: {out / SWEEP_FILE}, {out / SWEEP_TABLE}; plot: {out / SCALING_PLOT}; {time.perf_counter() - started:.0f}s")
    return 0


def cmd_explore(args) -> int:
    try:
        from .explorer import serve
    except ImportError as err:
        raise SbertSaeError(f"sbert-sae explore needs gradio ({err}): pip install 'sbert-sae[explore]'") from err
    print(f"opening {args.sae} (the corpus opens in the background)")
    serve(
        args.sae,
        dataset=args.dataset,
        text_column=args.text_column,
        revision=args.revision,
        host=args.host,
        port=args.port,
        share=args.share,
        open_browser=not args.no_browser,
        device=args.device,
        cache_dir=args.cache_dir,
        **_query_arguments(args),
    )
    return 0


def cmd_list(args) -> int:
    from .registry import format_registry, load_registry

    print(format_registry(load_registry()))
    return 0


def cmd_cache(args) -> int:
    from . import cache

    scan = cache.scan_cache(args.cache_dir)
    if args.cache_command in ("list", "ls", "scan"):
        if args.json:
            print(json.dumps({"cache_dir": str(scan.cache_dir), "records_dir": str(scan.records_dir), "entries": [e.to_json() for e in scan.entries], "size": scan.size, "trash_size": scan.trash_size}, indent=2))
            return 0
        print(f"cache: {scan.cache_dir}; JSON records: {scan.records_dir}")
        for entry in scan.entries:
            print("\n".join(cache.describe(entry)))
        counts = ", ".join(f"{sum(e.kind == kind for e in scan.entries)} {kind}" for kind in cache.KINDS)
        n_codes = sum(len(e.codes) for e in scan.entries)
        codes_size = sum(c.size for e in scan.entries for c in e.codes)
        print(f"{len(scan.entries)} entr{'y' if len(scan.entries) == 1 else 'ies'} ({counts}): {cache.format_size(scan.size + codes_size)}, of which {n_codes} SAE codes files {cache.format_size(codes_size)}")
        if scan.trash_size:
            print(f"left half removed by an interrupted `cache remove`: {cache.format_size(scan.trash_size)} (the next remove deletes it)")
        return 0
    picked = cache.select(scan, args.ids, older_than_days=args.older_than, partial=args.partial, codes=args.codes, all_entries=args.all_entries, kinds=args.kind)
    names = [f"{e.id} ({e.kind}, {e.status}, {cache.format_size(e.size + sum(c.size for c in e.codes))})" for e in picked.entries]
    names += [f"{e.id} codes-{c.digest} ({cache.format_size(c.size)})" for e, c in picked.codes]
    if not names:
        if scan.trash_size and not args.dry_run:
            cache.empty_trash(scan)
            print(f"deleted {cache.format_size(scan.trash_size)} left half removed by an interrupted `cache remove`")
        print("nothing to remove: no entry matches")
        return 0
    noun = ("codes file", "codes files") if args.codes else ("entry", "entries")
    what = f"{len(names)} {noun[len(names) != 1]}, {cache.format_size(picked.size)}"
    if args.dry_run:
        print(f"would remove {what}:")
        print("\n".join(f"  {name}" for name in names))
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise InputError(f"not on a terminal, so not asked: pass --yes to remove {what} (or --dry-run to see them)")
        print("\n".join(f"  {name}" for name in names))
        if input(f"remove {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    result = cache.remove(scan, picked)
    print(f"removed {len(result.removed)}, freed {cache.format_size(result.freed)}" + (f"; skipped {len(result.skipped)}" if result.skipped else ""))
    return EXIT_ERROR if result.skipped else 0


COMMANDS = {"cache": cmd_cache, "train": cmd_train, "label": cmd_label, "families": cmd_families, "embed": cmd_embed, "push": cmd_push, "release": cmd_release, "list": cmd_list, "info": cmd_info, "explore": cmd_explore, "compare": cmd_compare, "search": cmd_search, "sweep": cmd_sweep}


def _close_process_group() -> None:
    """Close the processes' group (`accelerate launch`, torchrun, mpirun) once the program's
    command is done, while Python still runs.

    Left open, its gloo worker threads outlive the command: one that has yet to let go of
    the tensor of a finished collective (each training step sums the firing counts over the
    processes) takes the GIL to do so, and once Python is shutting down that aborts the
    process ('terminate called without an active exception', SIGABRT; torch asks for
    destroy_process_group before exit). Closing the group joins those threads first."""
    if "torch" not in sys.modules:
        return  # a command that never loaded torch has no process group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _refuse_a_per_domain_folder(folder: str | None) -> None:
    """The folder of a `train --per-domain` run holds no SAE of its own, only its domains' (and
    domains.md): each command named it by what it lacked ("has no config.json", "pass
    --dataset"), and following that advice got nowhere. It is named for what it is."""
    if not isinstance(folder, str) or not os.path.isdir(folder):
        return
    path = Path(folder)
    if not (path / "domains.json").is_file() or (path / "config.json").exists():
        return
    domains = sorted(sub.name for sub in path.iterdir() if (sub / "config.json").is_file())
    shown = ", ".join(domains[:6]) + (f" and {len(domains) - 6} more" if len(domains) > 6 else "")
    example = f": name one, e.g. {path / domains[0]}" if domains else ""
    raise InputError(f"{folder} holds a --per-domain run: its SAEs, one per domain, are in its sub-folders ({shown or 'none yet'}){example}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    args.quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        for noisy in ("httpx", "httpx2", "urllib3", "filelock", "sentence_transformers", "transformers", "datasets", "accelerate", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.quiet:
        _disable_library_progress_bars()
    try:
        if getattr(args, "device", None) is not None:
            from .base_model import check_device

            with _naming_options(args, {"device": "device"}):
                check_device(args.device)  # before any work, which may find it only later
        if args.command in ("train", "embed", "sweep"):
            from .launch import relaunch_for_cpu_launcher

            code = relaunch_for_cpu_launcher(list(sys.argv[1:] if argv is None else argv))
            if code is not None:
                return code
        for folder in (getattr(args, name, None) for name in ("sae", "run_a", "run_b")):
            _refuse_a_per_domain_folder(folder)
        code = COMMANDS[args.command](args)
        if argv is None:
            # The program, about to exit (a caller from Python may go on using the group).
            # Not after an error: a thread may still wait there for a process that stopped.
            _close_process_group()
        return code
    except SbertSaeError as err:
        if args.debug:
            raise
        print(f"sbert-sae: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sbert-sae: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line, not a traceback, unless --debug
        if args.debug:
            raise
        print(f"sbert-sae: error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR
