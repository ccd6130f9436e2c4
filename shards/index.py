"""Index tar shards other tools wrote: `python shards/index.py FOLDER [--naming market]` (= ognet-index)."""

from ognet.data.foreign import main

if __name__ == "__main__":
    main()
