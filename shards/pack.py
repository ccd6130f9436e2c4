"""Pack a data set folder into webdataset shards: `python shards/pack.py ROOT OUT` (= ognet-pack)."""

from ognet.data.pack import main

if __name__ == "__main__":
    main()
