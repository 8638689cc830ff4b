"""FID, IS, KID and precision/recall of samples or models, and the U-ViC vs U-ViT comparison report.

    python eval_fid.py SAMPLES --ref REF [--kid] [--isc] [--prc]
    python eval_fid.py compare RUN_A RUN_B ... --ref REF --num-samples N

See `python eval_fid.py -h`, `python eval_fid.py compare -h`, uvic/evaluate.py and uvic/report.py.
"""

from uvic.evaluate import main

if __name__ == "__main__":
    main()
