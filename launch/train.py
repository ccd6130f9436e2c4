"""Train OG-Net: `torchrun --nproc_per_node=N launch/train.py --config configs/... [key=value ...]` (= ognet-train)."""

from ognet.stack_dumps import block_dump_signal

block_dump_signal()  # before any import starts a thread (numpy: OpenBLAS's pool), see ognet.stack_dumps

from ognet.train import main  # noqa: E402

if __name__ == "__main__":
    main()
