#!/usr/bin/env bash
# The paper's study (§3.1, App. B) on one GPU node: TL;DR, SFT per Pythia size, DPO/IPO/SLiC × 7 β per size
# (FSDP for 2.8B and 6.9B), samples of every checkpoint on 256 held-out prompts, the LLM judge, the fits.
#
#   bash scripts/paper_study.sh OUT_DIR --dry-run     # the commands, and the estimated GPU-hours and judge cost
#   OPENAI_API_KEY=... bash scripts/paper_study.sh OUT_DIR [--sizes pythia-1b,pythia-2.8b,pythia-6.9b] [--nproc N]
#                                                          [--seeds N] [--jobs N]
#
# The paper preset of scripts/study.py (docs/study.md). Re-running the same command resumes.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash scripts/paper_study.sh OUT_DIR [--dry-run] [--sizes LIST] [--nproc N] [--seeds N] [--jobs N]" >&2; exit 2; }
exec python "$(dirname "$0")/study.py" paper "$@"
