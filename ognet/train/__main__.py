"""`python -m ognet.train` (and `torchrun -m ognet.train`): the same as `ognet-train`."""

from ognet.train import main

main()
