"""Write a synthetic data set in the 3DMarket+bg layout: `python shards/synth.py --preset small --out data/synth`
(= ognet-synth)."""

from ognet.data.synth import main

if __name__ == "__main__":
    main()
