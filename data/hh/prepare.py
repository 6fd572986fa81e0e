"""Prepare Anthropic's Helpful and Harmless dialogues (Bai et al., 2022), the paper's second task.

    python data/hh/prepare.py                               # all four subsets -> $NANODAA_CACHE/data/hh
    python data/hh/prepare.py --subsets harmless-base --raw-dir ~/hh-rlhf

Each line of {subset}/{train,test}.jsonl.gz holds two dialogues, "chosen" and "rejected"
("\\n\\nHuman: ...\\n\\nAssistant: ..."), identical up to the final assistant reply. The prompt
is everything up to and including the last "\\n\\nAssistant:" the two share; chosen and
rejected are the two final replies, leading space included. Outputs:
- pref_train / pref_eval: {prompt, chosen, rejected} from train / test
- sft_train / sft_valid: {prompt, response = chosen reply} from train / test (the DPO
  reference code fine-tunes on the chosen dialogues for HH)
- eval_prompts: {id = "<subset>/test/<line>", prompt, reference = chosen reply} from test
A line is used or dropped as a whole; dropped: the dialogues part before the final reply
(more than one reply would differ), an empty reply, or identical replies.
"""
import argparse
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import files  # noqa: E402
from data.common import (DataError, DownloadError, comma_list, fetch, field, print_table,  # noqa: E402
                         read_jsonl, write_jsonl)
from download import cache_dir  # noqa: E402

BASE_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
SUBSETS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")
OUTPUTS = {"train": ("sft_train", "pref_train"), "test": ("sft_valid", "pref_eval", "eval_prompts")}
ASSISTANT, HUMAN = "\n\nAssistant:", "\n\nHuman:"


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out-dir", metavar="DIR", type=Path, default=None,
                    help="where to write the five .jsonl files (default: $NANODAA_CACHE/data/hh)")
parser.add_argument("--raw-dir", metavar="DIR", type=Path, default=None,
                    help="read DIR/<subset>/{train,test}.jsonl.gz instead of downloading them")
parser.add_argument("--base-url", metavar="URL", default=BASE_URL,
                    help="where to download from: the Hugging Face dataset or a mirror with the same layout "
                         "(default: %(default)s)")
parser.add_argument("--subsets", metavar="LIST", type=comma_list(SUBSETS), default=list(SUBSETS),
                    help=f"subsets to use, comma-separated (default: all four, {','.join(SUBSETS)})")


def split_dialogue(chosen, rejected):
    """(prompt, chosen reply, rejected reply): the prompt ends with the last "\\n\\nAssistant:" both share."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT) + len(ASSISTANT) if ASSISTANT in shared else 0
    return chosen[:cut], chosen[cut:], rejected[cut:]


def drop_reason(prompt, chosen, rejected):
    """Why a split dialogue is not a (prompt, one reply each) pair; None when it is."""
    if not prompt:
        return "no shared assistant turn"
    if HUMAN in chosen or HUMAN in rejected:
        return "dialogues part before the final reply"
    if not chosen or not rejected:
        return "empty reply"
    if chosen == rejected:
        return "identical replies"
    return None


def record(out, id_, prompt, chosen, rejected):
    """One row of output file `out` in the layout of docs/formats.md."""
    if out.startswith("sft_"):
        return {"prompt": prompt, "response": chosen}
    if out.startswith("pref_"):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {"id": id_, "prompt": prompt, "reference": chosen}


def main(argv=None):
    args = parser.parse_args(argv)
    out_dir = args.out_dir or cache_dir() / "data" / "hh"
    # Fetch everything first: a missing file fails the run before any work.
    paths = {(subset, split): fetch("hh", args.base_url, f"{subset}/{split}.jsonl.gz", args.raw_dir)
             for subset in args.subsets for split in OUTPUTS}
    stats, rows = defaultdict(Counter), defaultdict(list)
    for (subset, split), path in paths.items():
        for n, line in read_jsonl(path):
            where = f"{path}:{n}"
            prompt, chosen, rejected = split_dialogue(field(line, "chosen", where), field(line, "rejected", where))
            reason = drop_reason(prompt, chosen, rejected)
            for out in OUTPUTS[split]:
                stats[out]["read"] += 1
                stats[out][reason or "kept"] += 1
                if reason is None:
                    rows[out].append(record(out, f"{subset}/{split}/{n}", prompt, chosen, rejected))
    with files.atomic_dir(out_dir) as tmp:
        for out in (*OUTPUTS["train"], *OUTPUTS["test"]):
            write_jsonl(tmp / f"{out}.jsonl", rows[out])
    print_table(stats, out_dir)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, DownloadError) as e:
        sys.exit(f"error: {e}")
