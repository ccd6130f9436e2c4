"""Evaluate a checkpoint: `torchrun --nproc_per_node=N launch/evaluate.py --config ... --checkpoint ...` (= ognet-eval)."""

from ognet.evaluate import main

if __name__ == "__main__":
    main()
