"""Verify packed splits against their index: `python shards/verify.py OUT/train_all ...` (= ognet-verify)."""

from ognet.data.pack import verify_main

if __name__ == "__main__":
    verify_main()
