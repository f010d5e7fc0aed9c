#!/usr/bin/env bash
# Paper-scale commands for ONE GPU session (issue 13): the headline column of each paper, trimmed so that each command fits one
# 10-minute device command, with its estimate from nbs/11_paper_scale.ipynb (which parses this file; keep the format: one
# `run NAME EST_S papermill ...` or `fallback NAME FOR EST_S papermill ...` line per command). NOT called by CI (.ci/run never
# runs it): a GPU session runs
#   bash .ci/device_paper.sh [DATA_DIR] [NAME ...]
# DATA_DIR (default ~/.cache/noisyrepro) must hold MNIST and Fashion-MNIST (nothing is staged or downloaded here). NAMEs pick
# commands (default: limit dmi sln cdr, in this order: the STACKED commands, `-p stack K -p ckpt_every N -p eval_test best`).
# Each `fallback NAME FOR` line is the unstacked, smaller command of the earlier version: it runs when named, or at once after
# its stacked command FOR failed without timing out (the stack engine is untested on a GPU); both write the same out_dir, whose
# run keys do not depend on stacking, so the fallback skips every run the stacked command recorded. BUDGET_S (default 660:
# 15 device minutes less the machine's start) bounds the whole script: a command whose estimate exceeds the time left is
# skipped, and each runs under `timeout` (at most 600 s, the per-command limit, and never past the budget).
# Results: outputs/<notebook>/paper_gpu/; log: outputs/device_paper/<UTC time>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-$HOME/.cache/noisyrepro}"; shift || true
WANT=" ${*:-limit dmi sln cdr} "
declare -A RC=()                   # exit status of each command that ran
BUDGET_S="${BUDGET_S:-660}"
export NOISYREPRO_DATA="$DATA" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p outputs/device_paper
LOG="outputs/device_paper/$(date -u +%Y%m%dT%H%M%SZ).log"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

missing=0
for d in MNIST FashionMNIST; do
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [ ! -s "$DATA/$d/raw/$f" ] && [ ! -s "$DATA/$d/raw/$f.gz" ]; then log "missing: $DATA/$d/raw/$f(.gz)"; missing=1; fi
  done
done
[ "$missing" = 0 ] || { log "data folder $DATA lacks files (stage MNIST and Fashion-MNIST first); nothing was run"; exit 2; }
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" | tee -a "$LOG"

START=$(date +%s); STATUS=0
# start NAME EST_S papermill NOTEBOOK OUTPUT -p ...: run the command if its estimate fits the time left; its exit status in RC[NAME]
start() {
  local name=$1 est=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$est" -gt "$left" ]; then log "$name: skipped (estimate ${est} s > ${left} s left)"; return 0; fi
  local limit=$(( left < 600 ? left : 600 ))
  mkdir -p "$(dirname "$3")"
  log "$name: start (estimate ${est} s, timeout ${limit} s): $*"
  local t0=$(date +%s) rc=0
  timeout "$limit" "$@" --log-output >>"$LOG" 2>&1 || rc=$?
  log "$name: exit $rc after $(( $(date +%s) - t0 )) s"
  RC[$name]=$rc
  [ "$rc" = 0 ] || STATUS=1
}
# run NAME EST_S papermill ...: a default (stacked) command, run if NAME was asked for
run() { case "$WANT" in *" $1 "*) start "$@" ;; esac; }
# fallback NAME FOR EST_S papermill ...: run if NAME was asked for, or if command FOR ran and failed other than by timeout (124)
fallback() {
  local name=$1 for=$2; shift 2
  local rc=${RC[$for]:-}
  case "$WANT" in *" $name "*) start "$name" "$@"; return 0 ;; esac
  if [ -n "$rc" ] && [ "$rc" != 0 ] && [ "$rc" != 124 ]; then log "$name: $for failed (exit $rc): its unstacked fallback"; start "$name" "$@"; fi
}

# 1. LIMIT Tables 4-5 (MNIST, n = 10^3, p = 0, 0.5, 0.8, 0.89): 10 of the 11 methods (SoftReg and its 12-point grid dropped), LIMIT at beta = 10,
#    sigma_q = 0.1 (the grids' values; the other methods over their App. B grids), 2 splits instead of 5, 400 epochs, patience 100; stacked
run limit 415 papermill nbs/05_limit.ipynb outputs/05_limit/paper_gpu/05_limit.ipynb -p device cuda -p out_dir outputs/05_limit/paper_gpu -p scale paper -y 'noise: [0.0, 0.5, 0.8, 0.89]' -p n_train 1000 -p seeds 2 -y 'methods: [CE, CE+GN, CE+LN, MAE, FW, DMI-LIMIT, LIMIT_G-S, LIMIT_L-S, LIMIT_G+S, LIMIT_L+S]' -p beta 10.0 -p sigma_q 0.1 -p figures False -p stack 64 -p ckpt_every 100 -p eval_test best
#    fallback, unstacked (the earlier command): Table 5 at p = 0.8, CE and the four LIMIT variants, 1 split
fallback limit_small limit 160 papermill nbs/05_limit.ipynb outputs/05_limit/paper_gpu/05_limit_small.ipynb -p device cuda -p out_dir outputs/05_limit/paper_gpu -p scale paper -y 'noise: [0.8]' -p n_train 1000 -p seeds 1 -y 'methods: [CE, LIMIT_G-S, LIMIT_L-S, LIMIT_G+S, LIMIT_L+S]' -p beta 10.0 -p sigma_q 0.1 -p figures False
# 2. L_DMI Fig. 2 (Fashion-MNIST, cases 1-3): CE-DMI and DMI at every rate of the figure (r = 0 ... 0.9), 1 seed instead of 5, the scripts' 20 epochs each, fp32; stacked
run dmi 330 papermill nbs/07_dmi.ipynb outputs/07_dmi/paper_gpu/07_dmi.ipynb -p device cuda -p out_dir outputs/07_dmi/paper_gpu -p scale paper -p experiment fmnist -p seeds 1 -p figures True -p stack 64 -p ckpt_every 10 -p eval_test best
#    fallback, unstacked: r = 0, 0.4, 0.7 only
fallback dmi_small dmi 160 papermill nbs/07_dmi.ipynb outputs/07_dmi/paper_gpu/07_dmi_small.ipynb -p device cuda -p out_dir outputs/07_dmi/paper_gpu -p scale paper -p experiment fmnist -y 'noise: [0.0, 0.4, 0.7]' -p seeds 1 -p figures True
# 3. NOT SLN Table 1 (that needs CIFAR-10, which is not here): SLN's quick protocol (MNIST, LeNet) on the full training set, CE and the SLN
#    family, 5 seeds (a stack of 5 per method), 100 epochs instead of the paper's 300; stacked (these sweeps keep every epoch's test accuracy)
run sln 395 papermill nbs/06_sln.ipynb outputs/06_sln/paper_gpu/06_sln.ipynb -p device cuda -p out_dir outputs/06_sln/paper_gpu -p scale quick -p dataset mnist -p noise_types symmetric -p noise 0.4 -p n_train 55000 -p val 5000 -p seeds 5 -p epochs 100 -p baselines False -p figures False -p stack 16 -p ckpt_every 25 -p eval_test best
#    fallback, unstacked: 1 seed, 40 epochs
fallback sln_small sln 130 papermill nbs/06_sln.ipynb outputs/06_sln/paper_gpu/06_sln_small.ipynb -p device cuda -p out_dir outputs/06_sln/paper_gpu -p scale quick -p dataset mnist -p noise_types symmetric -p noise 0.4 -p n_train 55000 -p val 5000 -p seeds 1 -p epochs 40 -p baselines False -p figures False
# 4. CDR+AUX Table 1, pairflip 40%: SGD, CDR, AUX and CDR+AUX, 1 seed, 100 epochs, full MNIST, fp32. Not stacked: each method is alone in its
#    stack signature at one rate and seed, and two methods at the three rates (stacks of 3) would take about 9 minutes, too near the limit
run cdr 425 papermill nbs/08_cdr_aux.ipynb outputs/08_cdr_aux/paper_gpu/08_cdr_aux.ipynb -p device cuda -p out_dir outputs/08_cdr_aux/paper_gpu -p scale paper -p noise_type pairflip -p noise 0.4 -p seeds 1 -p figures False -p compare_rules False -p ckpt_every 25 -p eval_test best
#    fallback, unstacked: SGD and CDR+AUX only
fallback cdr_small cdr 260 papermill nbs/08_cdr_aux.ipynb outputs/08_cdr_aux/paper_gpu/08_cdr_aux_small.ipynb -p device cuda -p out_dir outputs/08_cdr_aux/paper_gpu -p scale paper -p noise_type pairflip -p noise 0.4 -p seeds 1 -y 'methods: [SGD, CDR+AUX]' -p figures False -p compare_rules False

log "done (exit $STATUS); log $LOG"
exit $STATUS
