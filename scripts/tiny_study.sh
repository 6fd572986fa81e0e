#!/usr/bin/env bash
# The miniature study: the paper's whole pipeline, offline, on a CPU, in minutes.
#
#   bash scripts/tiny_study.sh OUT_DIR            # the study (about 6 minutes on 2 cores)
#   bash scripts/tiny_study.sh OUT_DIR --quick    # plumbing check (under a minute)
#
# The same scripts as the full-scale recipe do the work: SFT a tiny GPT-NeoX, a
# DAA β sweep with checkpoints at 25/50/75/100 % of the epoch, samples with KL,
# win rates from the task's gold reward, scaling-law fits and figures. Writes
# OUT_DIR/summary.json and OUT_DIR/fit/*.png. Re-running resumes finished stages.
set -euo pipefail
out=${1:?usage: bash scripts/tiny_study.sh OUT_DIR [--quick]}
mode=${2:-full}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1  # tiny tensors: one thread per process, $jobs processes side by side
jobs=${JOBS:-2}
start=$SECONDS

if [ "$mode" = --quick ]; then
    sft_examples=2000 pref_examples=1024 eval_prompts=64 checkpoints=3
    betas="dpo:0.05 ipo:0.005 slic:0.05"
else
    sft_examples=30000 pref_examples=20000 eval_prompts=600 checkpoints=4
    betas="dpo:0.01 dpo:0.03 dpo:0.1 dpo:0.5
           ipo:0.002 ipo:0.005 ipo:0.01 ipo:0.05
           slic:0.01 slic:0.03 slic:0.1 slic:0.5"
fi
# Settings scaled down from App. B for a 140k-parameter model: Adam instead of
# RMSprop, larger learning rates, no warmup, batch 64; one epoch as the paper.
common="--batch-size 64 --micro-batch-size 64 --optimizer adamw --warmup 0 --log-interval 100"

echo "== 1. data: a synthetic TL;DR with a gold reward and a length-biased labeller"
[ -d "$out/data" ] || python data/tiny/prepare.py --out-dir "$out/data" \
    --sft-examples $sft_examples --pref-examples $pref_examples --eval-prompts $eval_prompts

echo "== 2. SFT from a random init"
python sft.py --model "$out/data/gpt-neox-tiny" --data "$out/data" --out "$out/sft" $common --lr 2e-3 --checkpoints 1

daa_run() {  # daa_run LOSS:BETA -> $out/LOSS-BETA/ckpt-*
    local loss=${1%:*} beta=${1#*:}
    python daa.py --init "$out/sft" --data "$out/data" --out "$out/$loss-$beta" --loss "$loss" --beta "$beta" \
        $common --lr 1e-4 --checkpoints $checkpoints --eval-examples 500 > "$out/$loss-$beta.log" 2>&1
}
evaluate_run() {  # evaluate_run RUN_DIR: sample every checkpoint (KL, length), then gold-judge each sample file
    python sample.py --ckpt "$1"/ckpt-* --ref "$out/sft/latest" --prompts "$out/data/eval_prompts.jsonl" \
        --n $eval_prompts --max-new-tokens 24 --batch-size 200 > /dev/null
    for samples in "$1"/samples-*.jsonl; do
        python judge.py "$samples" --judge gold --task tiny --gold-spec "$out/data/gold.json" > /dev/null
    done
}
export -f daa_run evaluate_run
export out common checkpoints eval_prompts

echo "== 3. DAA sweep (Eq. 4), $jobs runs at a time"
printf '%s\n' $betas | xargs -P "$jobs" -I{} bash -ec 'daa_run {}'

echo "== 4. samples and gold-judge win rates for every checkpoint"
printf '%s\n' "$out"/sft "$out"/*-*/ | xargs -P "$jobs" -I{} bash -ec 'evaluate_run {}'

echo "== 5. scaling-law fits (Eq. 5) and the paper's figures"
python fit.py "$out"/sft "$out"/*-*/ --out "$out/fit"
python scripts/tiny_summary.py "$out"
echo "done in $((SECONDS - start)) s: $out/summary.json, figures in $out/fit/"
