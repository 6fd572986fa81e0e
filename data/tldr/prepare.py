"""Prepare OpenAI's Reddit TL;DR data (Stiennon et al., 2020), the paper's main task (§4, App. B).

    python data/tldr/prepare.py                      # download everything, write $NANODAA_CACHE/data/tldr
    python data/tldr/prepare.py --raw-dir ~/tldr     # the same files, already on disk

Inputs, from OpenAI's summarize-from-feedback bucket:
- datasets/tldr_3_filtered/{train,valid,test}.jsonl: posts with one human summary each
  -> sft_train.jsonl, sft_valid.jsonl, eval_prompts.jsonl (the test split: held-out prompts
  whose human summary is the judge's reference)
- dataset/comparisons/batch{3..20,22}.json: human comparisons of two summaries of a post
  -> pref_train.jsonl (split "train", 92,858 rows) and pref_eval.jsonl (--eval-splits).
  The CNN/DM batches of the same folder are news articles, not TL;DR: skipped.

The prompt is OpenAI's query format; a post too long for --max-prompt-tokens is cut at
its last newline that fits, else its last word that fits, keeping the "\\n\\nTL;DR:" suffix
(OpenAI's truncation rule). A response is " " + the stripped summary: the model continues
"TL;DR:" with a space, as in the comparison data.
"""
import argparse
import bisect
import functools
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import files  # noqa: E402
from data.common import (DataError, DownloadError, comma_list, fetch, field, print_table,  # noqa: E402
                         read_jsonl, write_jsonl)
from download import cache_dir  # noqa: E402
from tokenizer import TokenizerError, load_tokenizer  # noqa: E402

BASE_URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback"
SFT_FILES = {"sft_train": "train", "sft_valid": "valid", "eval_prompts": "test"}  # output -> tldr_3_filtered split
BATCHES = [f"batch{i}" for i in range(3, 21)] + ["batch22"]
EVAL_SPLITS = ("valid1", "valid2")
FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out-dir", metavar="DIR", type=Path, default=None,
                    help="where to write the five .jsonl files (default: $NANODAA_CACHE/data/tldr)")
parser.add_argument("--raw-dir", metavar="DIR", type=Path, default=None,
                    help="read the upstream files from DIR/datasets/tldr_3_filtered/*.jsonl and "
                         "DIR/dataset/comparisons/*.json instead of downloading them")
parser.add_argument("--base-url", metavar="URL", default=BASE_URL,
                    help="where to download from: OpenAI's bucket or a mirror with the same layout (default: %(default)s)")
parser.add_argument("--batches", metavar="LIST", type=comma_list(BATCHES), default=BATCHES,
                    help="comparison batches to use, comma-separated, e.g. batch18,batch19 (default: all TL;DR batches, "
                         "batch3..batch20 and batch22)")
parser.add_argument("--eval-splits", metavar="LIST", type=comma_list(EVAL_SPLITS), default=["valid2"],
                    help="held-out comparison splits for pref_eval.jsonl, comma-separated (default: valid2, the split "
                         "OpenAI report results on; valid1 stays unused, free for tuning)")
parser.add_argument("--max-prompt-tokens", metavar="N", type=int, default=512,
                    help="cut posts so each prompt is at most this many tokens (default: %(default)s)")
parser.add_argument("--tokenizer", metavar="NAME_OR_PATH", default="pythia-160m",
                    help="tokenizer that counts prompt tokens: a Pythia name (all share one tokenizer), a tokenizer.json "
                         "or a directory holding one (default: %(default)s)")


def prompter(tok, max_tokens):
    """prompt(subreddit, title, post) -> (prompt, truncated), or None when not even one word of the post fits."""
    @functools.lru_cache(maxsize=1 << 16)  # the comparisons repeat each post many times
    def prompt(subreddit, title, post):
        def fits(p):
            return len(tok.encode(FORMAT.format(subreddit=subreddit, title=title, post=p))) <= max_tokens

        if fits(post):
            return FORMAT.format(subreddit=subreddit, title=title, post=post), False
        for boundary in (r"\n", r"\s"):  # the last newline that fits, else the last word that fits
            cuts = [m.start() for m in re.finditer(boundary, post) if post[:m.start()].strip()]
            # Token counts grow with the prefix, so bisect for the first cut that no longer fits.
            k = bisect.bisect_left(cuts, True, key=lambda i: not fits(post[:i].rstrip()))
            if k:
                return FORMAT.format(subreddit=subreddit, title=title, post=post[:cuts[k - 1]].rstrip()), True
        return None
    return prompt


def sft_rows(path, out, prompt, stats):
    """Rows of a tldr_3_filtered file: {prompt, response}, or {id, prompt, reference} for eval_prompts."""
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        id_, subreddit, title, post, summary = (field(row, k, where)
                                                for k in ("id", "subreddit", "title", "post", "summary"))
        c = stats[out]
        c["read"] += 1
        p = prompt(subreddit, title, post)
        if p is None:
            c["prompt too long"] += 1
        elif not summary.strip():
            c["empty summary"] += 1
        else:
            c["kept"] += 1
            c["truncated"] += p[1]
            response = " " + summary.strip()
            if out == "eval_prompts":
                yield {"id": id_, "prompt": p[0], "reference": response}
            else:
                yield {"prompt": p[0], "response": response}


def pref_rows(paths, eval_splits, prompt, stats):
    """pref_train and pref_eval rows {prompt, chosen, rejected} from comparison batches."""
    rows = {"pref_train": [], "pref_eval": []}
    for path in paths:
        for n, row in read_jsonl(path):
            where = f"{path}:{n}"
            split = field(row, "split", where)
            subreddit, title, post = (field(row, f"info.{k}", where) for k in ("subreddit", "title", "post"))
            summaries, choice = field(row, "summaries", where, list), field(row, "choice", where, int)
            if len(summaries) != 2 or choice not in (0, 1):
                raise DataError(f"{where}: expected 2 summaries and choice 0 or 1, got {len(summaries)} and {choice}")
            texts = [field(s, "text", f"{where}: summaries[{i}]") for i, s in enumerate(summaries)]
            out = "pref_train" if split == "train" else "pref_eval"
            c = stats[out]
            c["read"] += 1
            if out == "pref_eval" and split not in eval_splits:
                c[f"split {split} not in --eval-splits"] += 1
                continue
            p = prompt(subreddit, title, post)
            if p is None:
                c["prompt too long"] += 1
            else:
                c["kept"] += 1
                c["truncated"] += p[1]
                rows[out].append({"prompt": p[0], "chosen": " " + texts[choice].strip(),
                                  "rejected": " " + texts[1 - choice].strip()})
    return rows


def main(argv=None):
    args = parser.parse_args(argv)
    out_dir = args.out_dir or cache_dir() / "data" / "tldr"
    # Fetch everything first: a missing file fails the run before any work.
    sft_paths = {out: fetch("tldr", args.base_url, f"datasets/tldr_3_filtered/{split}.jsonl", args.raw_dir)
                 for out, split in SFT_FILES.items()}
    batch_paths = [fetch("tldr", args.base_url, f"dataset/comparisons/{b}.json", args.raw_dir) for b in args.batches]
    prompt = prompter(load_tokenizer(args.tokenizer), args.max_prompt_tokens)
    stats = defaultdict(Counter)
    with files.atomic_dir(out_dir) as tmp:
        for out, path in sft_paths.items():
            write_jsonl(tmp / f"{out}.jsonl", sft_rows(path, out, prompt, stats))
        for out, rows in pref_rows(batch_paths, args.eval_splits, prompt, stats).items():
            write_jsonl(tmp / f"{out}.jsonl", rows)
    print_table(stats, out_dir)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, DownloadError, TokenizerError) as e:
        sys.exit(f"error: {e}")
