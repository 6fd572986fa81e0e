"""Win rates of sampled responses against the dataset's references (§3, App. B).

The paper asks GPT-4 which of two summaries is better, the policy's sample or
the human reference, with the A/B order flipped at random to cancel the judge's
position bias. Here the judge is any OpenAI-compatible `/chat/completions`
endpoint (OpenAI, vLLM, llama.cpp server, Ollama):

    python judge.py out/run/samples-ckpt-100.jsonl     # gpt-4-turbo-2024-04-09, the paper's judge (App. B)
    python judge.py ... --model o3-mini --request-json '{"max_tokens": null, "max_completion_tokens": 2048}'
    python judge.py ... --prompt-file my_prompt.txt --verdict-label Winner   # another protocol

or, for the offline miniature task, its programmatic gold reward:

    python judge.py out/tiny/samples-ckpt-100.jsonl --judge gold --task tiny

Rows are appended to the judgments file as they arrive, so a crash loses
nothing and a re-run judges only what is missing. The summary (win rate ± SE,
the length-controlled win rate, unparseable replies, tokens) is printed and
written beside it as `<out minus .jsonl>.summary.json`.
"""
import argparse
import json
import os
import random
import re
import string
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import requests

import files
from data.tiny import task
from download import cache_dir

# Our own wording, in the style of the DPO paper's GPT-4 judge prompts (Rafailov et al., 2023, App. C).
PROMPTS = {
    "tldr": """Below is a forum post and two candidate summaries of it. Decide which summary better captures the most important points of the post, without including unimportant or irrelevant details. A good summary is precise and concise.

Post:
{prompt}

Summary A:
{a}

Summary B:
{b}

First compare the two summaries in one sentence, then name the better one. Answer in exactly this format:
Comparison: <one sentence comparing the summaries>
Preferred: <"A" or "B">""",
    "hh": """Below is a conversation between a person and an AI assistant, followed by two candidate replies for the assistant's next turn. Decide which reply is more helpful to the person.

Conversation:
{prompt}

Response A:
{a}

Response B:
{b}

First compare the two responses in one sentence, then name the more helpful one. Answer in exactly this format:
Comparison: <one sentence comparing the responses>
More helpful: <"A" or "B">""",
}
VERDICT = {"tldr": "Preferred", "hh": "More helpful"}


class Fatal(RuntimeError):
    """An error retrying cannot fix (bad key, no quota, wrong URL or model); one line for the user."""


def redact(text, key):
    return text.replace(key, "***") if key else text


def parse_verdict(reply, label):
    """'A', 'B' or None from the judge's reply: the last `<label>: A|B` line wins."""
    found = re.findall(rf"{re.escape(label)}\**\s*:\W*(?:summary |response )?([AB])\b", reply, flags=re.IGNORECASE)
    return found[-1].upper() if found else None


def policy_first(seed, id):
    """Is the policy's sample shown as A? A coin per item, seeded by (seed, id) so a resumed run flips the same."""
    return random.Random(f"{seed}:{id}").random() < 0.5  # str seeds hash with sha512: stable across processes


def retry_after(r):
    """Seconds the server asked us to wait on a 429 (OpenAI sends retry-after-ms), or None."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(r.headers[name]) * scale
        except (KeyError, ValueError):
            pass  # absent, or an HTTP date: fall back to backoff
    return None


def chat(url, key, body, max_retries, timeout, backoff, stop):
    """POST one chat completion; returns (reply text, usage dict). Retries what is transient.

    `stop` is set when another request failed for good: then this one gives up too.
    Error messages never carry the key, even when the server echoes it.
    """
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for attempt in range(max_retries + 1):
        if stop.is_set():
            raise Fatal("stopped: another request failed")
        wait = backoff * 2 ** attempt * random.uniform(0.5, 1.5)  # exponential backoff with jitter
        try:
            r = requests.post(url, json=body, headers=headers, timeout=timeout)
            if r.status_code == 200:
                data = r.json()
                return data["choices"][0]["message"]["content"] or "", data.get("usage") or {}
            if r.status_code in (401, 403) or "insufficient_quota" in r.text:
                raise Fatal(redact(f"HTTP {r.status_code} from {url}: {r.text[:300]} "
                                   "(check the API key, its quota and --base-url)", key))
            if r.status_code == 429:
                asked = retry_after(r)
                wait = wait if asked is None else asked
            elif r.status_code not in (408, 409) and r.status_code < 500:
                raise Fatal(redact(f"HTTP {r.status_code} from {url}: {r.text[:300]} ({advice(r, body)})", key))
            error = f"HTTP {r.status_code}"
        except (requests.Timeout, requests.ConnectionError) as e:
            error = type(e).__name__
        except (ValueError, KeyError, IndexError, TypeError):
            error = "a malformed 200 response"  # a proxy's HTML page, say: treat it as transient
        if attempt == max_retries:
            raise Fatal(f"{url}: {error}, still failing after {max_retries} retries (raise --max-retries or --timeout)")
        stop.wait(wait)


def advice(r, body):
    """What to try after a 4xx: a 400 that names a request parameter as unsupported (reasoning models
    reject max_tokens and temperature) is fixed with --request-json."""
    text = r.text.lower()
    named = [k for k in body if k not in ("model", "messages") and k in text]
    if r.status_code == 400 and named and any(w in text for w in ("unsupported", "not supported", "unrecognized",
                                                                   "unknown", "not allowed", "invalid")):
        return (f"the server rejects the request parameter {named[0]!r}: drop or rename it with --request-json, "
                f"e.g. --request-json '{{\"{named[0]}\": null, \"max_completion_tokens\": 1024}}'")
    return "check --model and --base-url"


def request_body(args, content):
    """The chat-completion request: our defaults, then --request-json merged over them (null drops a field)."""
    body = {"model": args.model, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": args.max_tokens}
    body.update(args.request_json)
    return {k: v for k, v in body.items() if v is not None}


def judge_llm(row, args, url, key, stop):
    """One LLM judgment of the policy's sample against the reference, A/B order flipped at random (App. B)."""
    first = policy_first(args.seed, row["id"])
    a, b = (row["sample"], row["reference"]) if first else (row["reference"], row["sample"])
    content = args.template.format(prompt=row["prompt"].strip(), a=a.strip(), b=b.strip())
    body = request_body(args, content)
    try:
        reply, usage = chat(url, key, body, args.max_retries, args.timeout, args.backoff, stop)
    except Fatal:
        stop.set()  # the other threads stop before their next request
        raise
    reply = redact(reply, key)
    verdict = parse_verdict(reply, args.verdict_label)
    win = 0.5 if verdict is None else float((verdict == "A") == first)
    return {"id": row["id"], "policy_first": first, "verdict": verdict, "win": win, "reply": reply,
            "usage": {k: usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}


def judge_gold(row, spec):
    """The miniature's judge: the sample wins when its gold reward (data/tiny/task.py) beats the reference's."""
    g_sample = task.gold_reward(row["prompt"], row["sample"], spec)
    g_ref = task.gold_reward(row["prompt"], row["reference"], spec)
    win = 1.0 if g_sample > g_ref else 0.5 if g_sample == g_ref else 0.0
    return {"id": row["id"], "gold_sample": g_sample, "gold_reference": g_ref, "win": win}


def lc_win_rate(wins, length_diff, l2=1e-2, iters=100):
    """Length-controlled win rate, as AlpacaEval: fit P(win) = σ(a + b·Δ) by
    logistic regression on the length difference Δ (sample − reference) and read
    it at Δ = 0, i.e. σ(a). Newton's method (IRLS); the small L2 keeps a and b
    finite when the wins are separable (all wins, say). Ties count as half a win.
    """
    y = np.asarray(wins, dtype=float)
    d = np.asarray(length_diff, dtype=float)
    X = np.stack([np.ones_like(d), d / (d.std() or 1.0)], 1)  # scale Δ, not shift it: Δ = 0 must stay at 0
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0])))


def summarize(judged, samples):
    wins = np.array([r["win"] for r in judged])
    n = len(wins)
    diff = [len(samples[r["id"]]["sample"].split()) - len(samples[r["id"]]["reference"].split()) for r in judged]
    usage = [r.get("usage", {}) for r in judged]
    return {"win_rate": float(wins.mean()), "win_rate_se": float(wins.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
            "lc_win_rate": lc_win_rate(wins, diff), "n": n,
            "unparseable": sum(r.get("reply") is not None and r["verdict"] is None for r in judged),
            "tokens": sum(u.get("total_tokens", 0) for u in usage),
            "prompt_tokens": sum(u.get("prompt_tokens", 0) for u in usage),
            "completion_tokens": sum(u.get("completion_tokens", 0) for u in usage)}


def read_judged(path):
    """Rows already judged; a last line cut short by a crash is dropped from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    if len(keep) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return files.read_jsonl(path, ("id", "win"))


def default_out(samples_path):
    """samples-<ckpt>.jsonl -> judgments-<ckpt>.jsonl beside it."""
    p = Path(samples_path)
    stem = p.stem.removeprefix("samples-")
    return p.with_name(f"judgments-{stem}.jsonl" if stem != p.stem else f"{p.stem}.judgments.jsonl")


def summary_path(out):
    return Path(out).with_suffix(".summary.json")  # judgments-ckpt-100.jsonl -> judgments-ckpt-100.summary.json


def read_template(path):
    """A judge prompt from a file: a str.format template with exactly the fields {prompt}, {a}, {b}
    (write a literal brace as {{ or }})."""
    text = Path(path).read_text()
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise ValueError(f"{path}: not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    if fields != {"prompt", "a", "b"}:
        raise ValueError(f"{path}: the template needs the fields {{prompt}}, {{a}} and {{b}} and no others, "
                         f"has {', '.join(sorted('{' + f + '}' for f in fields)) or 'none'}")
    return text


def parse_request_json(text):
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(extra, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return extra


def judge_all(todo, work, threads, out, judged, stop):
    """Judge `todo` on `threads` threads, appending each verdict to `out` as it arrives (a crash loses
    nothing) and to `judged`. `stop`: the LLM judge's event, set on an interrupt."""
    t0 = time.time()
    with open(out, "a") as f, ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, row) for row in todo]
        try:
            for i, fut in enumerate(as_completed(futures), 1):
                row = fut.result()
                f.write(json.dumps(row) + "\n")
                f.flush()  # append as they arrive: a crash loses nothing
                judged[row["id"]] = row
                if i % max(1, len(todo) // 20) == 0 or i == len(todo):
                    rate = i / (time.time() - t0)
                    print(f"judged {i}/{len(todo)} ({rate:.1f}/s, ETA {(len(todo) - i) / rate:.0f} s)", flush=True)
        except BaseException:
            if stop is not None:
                stop.set()  # Ctrl-C, say: requests in flight give up at their next retry
            for fut in futures:
                fut.cancel()
            raise


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("samples", help="samples JSONL from sample.py (id, prompt, sample, reference)")
    p.add_argument("--out", default=None, help="judgments JSONL, appended to; if omitted, judgments-<ckpt>.jsonl beside samples-<ckpt>.jsonl")
    p.add_argument("--judge", choices=("llm", "gold"), default="llm", help="an LLM over an OpenAI-compatible API, or the miniature task's gold reward")
    p.add_argument("--task", choices=("tldr", "hh", "tiny"), default="tldr", help="which judge prompt (tldr, hh) or gold reward (tiny)")
    p.add_argument("--base-url", default="https://api.openai.com/v1", help="OpenAI-compatible API root; POSTs {base-url}/chat/completions")
    p.add_argument("--model", default="gpt-4-turbo-2024-04-09", help="judge model name as the server knows it "
                   "(the default is the paper's judge, App. B)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (local servers need none)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--seed", type=int, default=0, help="seeds the per-item A/B flip")
    p.add_argument("--max-retries", type=int, default=8, help="retries per request on 429, 408, 409, 5xx and timeouts")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds; doubles each retry, with jitter")
    p.add_argument("--max-tokens", type=int, default=256, help="reply length limit for the judge (the request's max_tokens)")
    p.add_argument("--prompt-file", default=None, help="judge prompt template with {prompt}, {a} and {b} "
                   "(default: the built-in one of --task)")
    p.add_argument("--verdict-label", default=None, help="the reply's line label whose A or B is the verdict, as "
                   "in 'Preferred: A' (default: the built-in prompt's, Preferred for tldr, More helpful for hh)")
    p.add_argument("--request-json", type=parse_request_json, default={}, help="JSON object merged into every "
                   "request body; null drops a field, e.g. '{\"max_tokens\": null, \"max_completion_tokens\": 1024}' "
                   "for a reasoning model")
    p.add_argument("--gold-spec", default=str(cache_dir() / "data" / "tiny" / "gold.json"), help="the tiny task's gold.json (its important words)")
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if (args.judge == "gold") != (args.task == "tiny"):
        p.error("--judge gold goes with --task tiny, and --task tiny with --judge gold")
    if args.judge == "llm":
        args.template = read_template(args.prompt_file) if args.prompt_file else PROMPTS[args.task]
        if args.prompt_file and not args.verdict_label:
            p.error("--prompt-file needs --verdict-label: the line label whose A or B your prompt asks for")
        args.verdict_label = args.verdict_label or VERDICT[args.task]

    samples = {r["id"]: r for r in files.read_jsonl(args.samples, ("id", "prompt", "sample", "reference"))}
    out = Path(args.out) if args.out else default_out(args.samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    files.hold(f"{out}.lock", out)  # one writer per judgments file: a second judge.py on it refuses at once
    judged = {r["id"]: r for r in read_judged(out) if r["id"] in samples}
    todo = [r for r in samples.values() if r["id"] not in judged]
    if judged:
        print(f"{len(judged)} already judged in {out}; judging the other {len(todo)}")

    if args.judge == "gold":
        spec = task.read_spec(args.gold_spec, ("important",))  # the gold judge needs no labeller
        work, threads, stop = (lambda row: judge_gold(row, spec)), 1, None
    else:
        key = os.environ.get(args.api_key_env)
        if not key and "api.openai.com" in args.base_url:
            raise ValueError(f"set {args.api_key_env} to your OpenAI API key (or point --base-url at a local server)")
        url, stop = args.base_url.rstrip("/") + "/chat/completions", threading.Event()
        work, threads = (lambda row: judge_llm(row, args, url, key, stop)), args.concurrency

    judge_all(todo, work, threads, out, judged, stop)
    if not judged:
        raise ValueError(f"{args.samples} holds no samples")
    s = summarize([judged[i] for i in samples if i in judged], samples)  # in file order: same floats on resume
    files.write_json(summary_path(out), s)
    print(f"win rate {s['win_rate']:.3f} ± {s['win_rate_se']:.3f} (n={s['n']}), length-controlled {s['lc_win_rate']:.3f}, "
          f"unparseable {s['unparseable']}, tokens {s['tokens']:,} ({s['prompt_tokens']:,} in, {s['completion_tokens']:,} out)")
    print(f"wrote {out} and {summary_path(out)}")
    files.release(f"{out}.lock")
    return s


if __name__ == "__main__":
    try:
        main()
    except (Fatal, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
