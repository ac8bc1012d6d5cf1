#!/usr/bin/env python
"""Train a Flax NNX ResNet: ``python train.py --help``.

The command line is ``flax_resnet.train_cli`` (also installed as ``flax-resnet-train``); the
training loop it calls is ``flax_resnet.trainer.train_and_evaluate``.
"""

import sys

from flax_resnet.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
