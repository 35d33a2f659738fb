"""Thin shim: `python train.py model=din data=ecommerce`. The code lives in recsys_lab/train.py."""

from recsys_lab.train import main

if __name__ == "__main__":
    main()
