"""Sample a grid or a large sample set from a U-ViT / U-ViC: `python sample.py MODEL --grid 8`.

Several processes: `accelerate launch sample.py MODEL --num-samples 50000 --out DIR`.
All the work is in uvic/sampling.py; `python sample.py --help` lists the options.
"""

from uvic.sampling import main

if __name__ == "__main__":
    main()
