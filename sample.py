"""Sample a grid or a large sample set from a U-ViT / U-ViC: `python sample.py MODEL --grid 8`.

Several processes: `accelerate launch sample.py MODEL --num-samples 50000 --out DIR`.
The command line is uvic/sampling.py (drawing in uvic/drawing.py, the set format in uvic/sample_sets.py);
`python sample.py --help` lists the options.
"""

from uvic.sampling import main

if __name__ == "__main__":
    main()
