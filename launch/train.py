"""Train OG-Net: `torchrun --nproc_per_node=N launch/train.py --config configs/... [key=value ...]` (= ognet-train)."""

from ognet.train import main

if __name__ == "__main__":
    main()
