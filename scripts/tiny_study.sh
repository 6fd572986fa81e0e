#!/usr/bin/env bash
# The miniature study: the paper's whole pipeline, offline, on a CPU, in minutes.
#
#   bash scripts/tiny_study.sh OUT_DIR              # the study
#   bash scripts/tiny_study.sh OUT_DIR --quick      # plumbing check (about half a minute)
#   bash scripts/tiny_study.sh OUT_DIR [--seeds N] [--same-data] [--scaling] [--bench] [--frontier]
#                                      [--losses LIST] [--variant NAME] [--labeller NAME] [--no-byte-fallback]
#                                      [--jobs N] [--dry-run]
#
# The tiny preset of scripts/study.py (its settings: the TINY dict there; docs/study.md): per seed its own
# data, SFT a tiny GPT-NeoX, a DAA β sweep with checkpoints over the epoch, samples with KL, win rates from
# the task's gold reward, scaling-law fits and figures. Writes OUT_DIR/summary.json and OUT_DIR/fit/*.png.
# Re-running the same command resumes: finished steps are skipped.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash scripts/tiny_study.sh OUT_DIR [--quick] [--seeds N] [--same-data] [--scaling] [--bench] [--frontier] [--losses LIST] [--variant NAME] [--labeller NAME] [--no-byte-fallback] [--jobs N] [--dry-run]" >&2; exit 2; }
exec python "$(dirname "$0")/study.py" tiny "$@"
