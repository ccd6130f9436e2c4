#!/usr/bin/env bash
# The demo: set up, synthesise a small 3D person data set, pack it into shards, train OG-Net-Small
# on 2 processes with torchrun, evaluate the final checkpoint on 2 processes. About 5.6 minutes on 2
# CPU cores, set-up included (benchmarks/results/demo.md).
#   bash launch/demo.sh            (OGNET_DEMO_DIR=data/demo, runs/demo by default)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
BIN="$(dirname "$OGNET_PY")"
DATA="${OGNET_DEMO_DIR:-data/demo}"
RUN="${OGNET_DEMO_RUN:-runs/demo}"
NPROC="${OGNET_DEMO_NPROC:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "== 1/4 synthesise persons -> $DATA/raw"
"$BIN/ognet-synth" --out "$DATA/raw" --preset small --points 2048 --no-progress
echo "== 2/4 pack webdataset shards -> $DATA/shards"
"$BIN/ognet-pack" "$DATA/raw" "$DATA/shards" --max-count 64
"$BIN/ognet-verify" "$DATA/shards"/*/
echo "== 3/4 train on $NPROC processes (torchrun, gloo on CPU / nccl on GPUs) -> $RUN"
"$BIN/torchrun" --standalone --nproc_per_node="$NPROC" launch/train.py --config configs/demo.yaml \
  data.root="$DATA/shards" run_dir="$RUN"
echo "== 4/4 evaluate $RUN/model_last.pt on $NPROC processes"
"$BIN/torchrun" --standalone --nproc_per_node="$NPROC" launch/evaluate.py --config configs/demo.yaml \
  --checkpoint "$RUN/model_last.pt" data.root="$DATA/shards" run_dir="$RUN/eval" eval.save_features=true

echo
grep -h "Rank@1" "$RUN/eval/result.txt"
cat <<DONE

Demo finished.
  data set (.obj, 3DMarket+bg layout)   $DATA/raw
  shards + index.json                   $DATA/shards/{train_all,query,gallery}
  resolved config                       $RUN/config.yaml
  checkpoints (resume: run again)       $RUN/checkpoints/   final weights: $RUN/model_last.pt
  metrics                               $RUN/metrics-eval.json  $RUN/eval/metrics-eval.json  $RUN/result.txt
  features                              $RUN/eval/features-eval-{query,gallery}.npy
  rank lists (query + top 10)           $RUN/eval/rank-list-eval-*.png
  TensorBoard                           $BIN/tensorboard --logdir $RUN --host 127.0.0.1
DONE
