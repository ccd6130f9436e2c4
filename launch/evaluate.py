"""Evaluate a checkpoint: `torchrun --nproc_per_node=N launch/evaluate.py --config ... --checkpoint ...` (= ognet-eval)."""

from ognet.stack_dumps import block_dump_signal

block_dump_signal()  # before any import starts a thread (numpy: OpenBLAS's pool), see ognet.stack_dumps

from ognet.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
